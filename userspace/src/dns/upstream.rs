//! The upstream DNS client shared by every sandbox's queries.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::Header;
use hickory_proto::serialize::binary::BinDecodable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::util::clock::boot_time_ns;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("DNS upstream: {0}")]
    Io(#[source] std::io::Error),
    #[error("DNS upstream: no answer within {0:?}")]
    Timeout(Duration),
    #[error("DNS upstream: {pending} queries already in flight (the cap)")]
    Busy { pending: usize },
}


/// One UDP socket per upstream family for all queries, with our own query
/// ids (guests' ids may collide) from a bounded pending table, and TCP on
/// truncation.
pub struct UpstreamClient {
    sockets: tokio::sync::OnceCell<UpstreamSocket>,
    /// Queries in flight at most: past it, [`UpstreamError::Busy`].
    pending_cap: usize,
    /// Questions upstream now, by their bytes after the id: a query
    /// identical to one in flight waits for that one's answer instead of
    /// asking again (as unbound and dnsmasq do). The waiters get the bytes.
    in_flight: InFlight,
    /// Whether identical queries share one upstream query at all (the
    /// daemon's `dns_share_upstream_queries`).
    share: bool,
    /// The runtime the sockets are registered with and their answers are
    /// taken in on (None: the first caller's).
    receive_on: Option<tokio::runtime::Handle>,
}

/// Question bytes → when it was asked upstream, and the identical queries
/// waiting for its answer.
type InFlight = Mutex<HashMap<Vec<u8>, (tokio::time::Instant, Vec<tokio::sync::oneshot::Sender<Vec<u8>>>)>>;

/// A query joins an identical one only this soon after that one was sent:
/// later, it is more likely a guest's retry of a lost query than a second
/// asker, and asks upstream itself (a new id), as a resolver retrying would.
const JOIN_WITHIN: Duration = Duration::from_millis(400);

/// Less time than this left after the shared query failed: no query of
/// its own (it could not be answered in time), a timeout at once.
const MIN_OWN_ATTEMPT: Duration = Duration::from_millis(50);

/// The query that asks upstream for its question, and answers every
/// identical query that came while it was in flight. Dropped unfinished
/// (failed, timed out or cancelled), its waiters ask on their own.
struct Asking<'a> {
    in_flight: &'a InFlight,
    question: Vec<u8>,
}

impl Asking<'_> {
    fn waiters(&self) -> Vec<tokio::sync::oneshot::Sender<Vec<u8>>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.question).map(|(_, waiters)| waiters).unwrap_or_default()
    }

    fn answered(self, response: &[u8]) {
        for waiter in self.waiters() {
            let _ = waiter.send(response.to_vec());
        }
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        // Answered: already gone. Otherwise the waiters' channels close.
        drop(self.waiters());
    }
}

/// A socket connected to `upstream` (registered with the calling runtime),
/// and the task there that hands each answer to the query waiting for its
/// id.
async fn open_socket(upstream: SocketAddr) -> std::io::Result<UpstreamSocket> {
    let bind: SocketAddr = if upstream.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = Arc::new(UdpSocket::bind(bind).await?);
    socket.connect(upstream).await?;
    let pending: Arc<Pending> = Arc::default();
    let (rx_socket, rx_pending) = (socket.clone(), pending.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let Ok(n) = rx_socket.recv(&mut buf).await else { continue };
            // Shorter than a header: nobody's answer.
            let Ok(header) = Header::from_bytes(&buf[..n]) else { continue };
            let waiter = rx_pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&header.id());
            if let Some(tx) = waiter {
                let _ = tx.send(buf[..n].to_vec());
            }
        }
    });
    Ok(UpstreamSocket { socket, pending })
}

/// Default of the pending table's cap: a sixteenth of the id space, so a
/// probe from a random id meets a free one within a few steps.
pub const MAX_PENDING_UPSTREAM: usize = 4096;

type Pending = Mutex<HashMap<u16, tokio::sync::oneshot::Sender<Vec<u8>>>>;

struct UpstreamSocket {
    socket: Arc<UdpSocket>,
    pending: Arc<Pending>,
}

impl Default for UpstreamClient {
    fn default() -> Self {
        UpstreamClient::with_pending_cap(MAX_PENDING_UPSTREAM)
    }
}

/// A pending-table entry, removed when the query ends however it ends
/// (answered, timed out, or its future dropped).
struct PendingEntry<'a> {
    pending: &'a Pending,
    id: u16,
}

impl Drop for PendingEntry<'_> {
    fn drop(&mut self) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl UpstreamClient {
    /// `share`: false sends every query upstream on its own.
    pub fn sharing(mut self, share: bool) -> Self {
        self.share = share;
        self
    }

    /// A client with at most `cap` queries in flight (1..=65535).
    pub fn with_pending_cap(cap: usize) -> Self {
        UpstreamClient { sockets: tokio::sync::OnceCell::new(), pending_cap: cap.clamp(1, usize::from(u16::MAX)), in_flight: Mutex::default(), share: true, receive_on: None }
    }

    /// Opens the sockets on `runtime` and takes the answers in there,
    /// whoever asks first (the DNS proxy's own thread: a lookup of the
    /// credential proxy must not put every answer behind a busy thread's
    /// connections).
    pub fn receiving_on(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.receive_on = Some(runtime);
        self
    }

    async fn socket(&self, upstream: SocketAddr) -> std::io::Result<&UpstreamSocket> {
        self.sockets
            .get_or_try_init(|| async move {
                match &self.receive_on {
                    Some(runtime) => runtime.spawn(open_socket(upstream)).await.map_err(std::io::Error::other)?,
                    None => open_socket(upstream).await,
                }
            })
            .await
    }

    /// Takes a free id for a query: Err when `pending_cap` queries are in
    /// flight. At most `cap - 1` ids are taken then, so one of any `cap`
    /// consecutive ids is free: a bounded probe from a random start, never
    /// a spin under the lock.
    fn take_id<'a>(&self, pending: &'a Pending, tx: tokio::sync::oneshot::Sender<Vec<u8>>) -> Result<PendingEntry<'a>, UpstreamError> {
        let start = random_id();
        let mut table = pending.lock().unwrap_or_else(|p| p.into_inner());
        if table.len() >= self.pending_cap {
            return Err(UpstreamError::Busy { pending: table.len() });
        }
        let id = (0..=self.pending_cap as u16).map(|i| start.wrapping_add(i)).find(|id| !table.contains_key(id));
        let Some(id) = id else { return Err(UpstreamError::Busy { pending: table.len() }) };
        table.insert(id, tx);
        Ok(PendingEntry { pending, id })
    }

    /// Forwards `query` (a message the proxy encoded itself; the answer
    /// comes back with its id); on a truncated UDP answer, asks again over
    /// TCP. A query whose bytes after the id equal one's in flight takes
    /// that one's answer (within `timeout`); when that one fails, it asks
    /// on its own with the time left.
    pub async fn forward(&self, upstream: SocketAddr, query: &[u8], timeout: Duration) -> Result<Vec<u8>, UpstreamError> {
        let Some(question) = query.get(2..).filter(|_| query.len() >= 12) else {
            return Err(UpstreamError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, "short query")));
        };
        if !self.share {
            return self.forward_alone(upstream, query, timeout).await;
        }
        let now = tokio::time::Instant::now();
        let deadline = now + timeout;
        enum Role {
            Ask,
            Wait(tokio::sync::oneshot::Receiver<Vec<u8>>),
            Alone,
        }
        let role = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            match in_flight.get_mut(question) {
                Some((asked, waiters)) if now.duration_since(*asked) < JOIN_WITHIN => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    waiters.push(tx);
                    Role::Wait(rx)
                }
                // Asked a while ago and still unanswered: maybe lost.
                Some(_) => Role::Alone,
                None => {
                    in_flight.insert(question.to_vec(), (now, Vec::new()));
                    Role::Ask
                }
            }
        };
        let answer = match role {
            Role::Alone => return self.forward_alone(upstream, query, timeout).await,
            Role::Wait(answer) => answer,
            Role::Ask => {
                let asking = Asking { in_flight: &self.in_flight, question: question.to_vec() };
                let response = self.forward_alone(upstream, query, timeout).await?;
                asking.answered(&response);
                return Ok(response);
            }
        };
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(mut response)) => {
                set_id(&mut response, u16::from_be_bytes([query[0], query[1]]));
                Ok(response)
            }
            Ok(Err(_)) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left < MIN_OWN_ATTEMPT {
                    return Err(UpstreamError::Timeout(timeout));
                }
                self.forward_alone(upstream, query, left).await
            }
            Err(_) => Err(UpstreamError::Timeout(timeout)),
        }
    }

    async fn forward_alone(&self, upstream: SocketAddr, query: &[u8], timeout: Duration) -> Result<Vec<u8>, UpstreamError> {
        let Ok(query_header) = Header::from_bytes(query) else {
            return Err(UpstreamError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, "short query")));
        };
        let s = self.socket(upstream).await.map_err(UpstreamError::Io)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let entry = self.take_id(&s.pending, tx)?;
        let mut ours = query.to_vec();
        set_id(&mut ours, entry.id);
        s.socket.send(&ours).await.map_err(UpstreamError::Io)?;
        let answered = tokio::time::timeout(timeout, rx).await;
        drop(entry);
        let mut response = match answered {
            Ok(Ok(r)) => r,
            _ => return Err(UpstreamError::Timeout(timeout)),
        };
        // The receiver only hands on what has a header.
        let truncated = Header::from_bytes(&response).is_ok_and(|h| h.truncated());
        if truncated {
            response = tokio::time::timeout(timeout, async {
                let mut stream = TcpStream::connect(upstream).await?;
                write_framed(&mut stream, query).await?;
                read_framed(&mut stream).await
            })
            .await
            .map_err(|_| UpstreamError::Timeout(timeout))?
            .map_err(UpstreamError::Io)?;
            if Header::from_bytes(&response).is_err() {
                return Err(UpstreamError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, "short answer over TCP")));
            }
        }
        set_id(&mut response, query_header.id());
        Ok(response)
    }
}

/// Puts `id` into a message that has a header (checked by the caller), in
/// place: the answer goes back to the guest byte for byte when nothing in
/// it is stripped, and decoding and re-encoding it would not keep that
/// (name compression, record order, unknown data).
fn set_id(message: &mut [u8], id: u16) {
    message[..2].copy_from_slice(&id.to_be_bytes());
}

/// Query ids fetched from the kernel's CSPRNG at a time: one getrandom(2)
/// per this many upstream queries instead of one each.
const IDS_PER_FILL: usize = 128;

/// A query id nobody off the path can predict: from the kernel's CSPRNG,
/// taken from a per-thread buffer filled `IDS_PER_FILL` ids at a time (as
/// unpredictable as one call per id; the buffer never leaves the thread).
fn random_id() -> u16 {
    thread_local! {
        static IDS: std::cell::RefCell<([u8; 2 * IDS_PER_FILL], usize)> = const { std::cell::RefCell::new(([0; 2 * IDS_PER_FILL], 2 * IDS_PER_FILL)) };
    }
    IDS.with_borrow_mut(|(bytes, used)| {
        if *used == bytes.len() {
            // SAFETY: getrandom writes at most `bytes.len()` bytes into
            // `bytes`, which we own for the call.
            let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
            if n != bytes.len() as isize {
                // getrandom cannot fail for 256 bytes once the pool is
                // initialised; still never block a query on it.
                return (boot_time_ns() ^ u64::from(std::process::id()).rotate_left(17)) as u16;
            }
            *used = 0;
        }
        let id = u16::from_ne_bytes([bytes[*used], bytes[*used + 1]]);
        // Used bytes are not kept.
        bytes[*used..*used + 2].fill(0);
        *used += 2;
        id
    })
}


/// DNS over TCP framing: a two-byte length, then the message.
pub(crate) async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

pub(crate) async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("DNS message over 64 KiB"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await
}


#[cfg(test)]
mod tests {
    use super::*;

    fn entries(table: &Pending) -> usize {
        table.lock().unwrap().len()
    }

    /// Issue 12: with 65 536 queries pending, picking an id looped forever
    /// while holding the table's lock.
    #[test]
    fn query_ids_stay_unpredictable_across_refills() {
        let ids: Vec<u16> = (0..IDS_PER_FILL * 8).map(|_| random_id()).collect();
        let distinct: std::collections::HashSet<u16> = ids.iter().copied().collect();
        // 1024 draws from 65536: ~8 repeats expected; 64 would be a broken source.
        assert!(distinct.len() > ids.len() - 64, "{} distinct of {}", distinct.len(), ids.len());
        let fills: Vec<&[u16]> = ids.chunks(IDS_PER_FILL).collect();
        assert!(fills.windows(2).all(|w| w[0] != w[1]), "each refill is new bytes");
    }

    #[test]
    fn a_full_pending_table_is_busy_at_once_never_a_spin() {
        let client = UpstreamClient::with_pending_cap(usize::MAX);
        assert_eq!(client.pending_cap, 65535, "the cap leaves an id free");
        // 65 534 queries in flight: two ids free, 40 000 and 65 535.
        let table: Pending = Mutex::default();
        let mut receivers = Vec::new();
        for id in (0..u16::MAX).filter(|id| *id != 40_000) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            receivers.push(rx);
            table.lock().unwrap().insert(id, tx);
        }
        assert_eq!(entries(&table), 65534);
        // A free id is found within the bounded probe, wherever the probe
        // starts.
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let last = client.take_id(&table, tx).expect("a free id below the cap");
        assert!(last.id == 40_000 || last.id == u16::MAX, "{}", last.id);
        assert_eq!(entries(&table), 65535);
        let started = std::time::Instant::now();
        let (tx, _rx) = tokio::sync::oneshot::channel();
        assert!(matches!(client.take_id(&table, tx), Err(UpstreamError::Busy { pending: 65535 })));
        assert!(started.elapsed() < Duration::from_secs(1));
        // An entry goes with its query.
        drop(last);
        assert_eq!(entries(&table), 65534);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn queries_past_the_pending_cap_fail_fast_and_cancelled_ones_free_their_ids() {
        // An upstream that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstream = silent.local_addr().unwrap();
        let client = Arc::new(UpstreamClient::with_pending_cap(64));
        // 64 different questions (identical ones would share one query).
        let query = |n: u8| -> Vec<u8> { [&[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0][..], &[1, n, 0, 0, 1, 0, 1]].concat() };
        let waiting: Vec<_> = (0..64)
            .map(|n| {
                let (client, query) = (client.clone(), query(n));
                tokio::spawn(async move { client.forward(upstream, &query, Duration::from_secs(60)).await })
            })
            .collect();
        let pending = || client.sockets.get().map_or(0, |s| entries(&s.pending));
        while pending() < 64 {
            tokio::task::yield_now().await;
        }
        let started = std::time::Instant::now();
        let busy = client.forward(upstream, &query(64), Duration::from_secs(60)).await;
        assert!(matches!(busy, Err(UpstreamError::Busy { pending: 64 })), "{busy:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        for task in &waiting {
            task.abort();
        }
        for task in waiting {
            let _ = task.await;
        }
        assert_eq!(pending(), 0, "a dropped query leaves no entry behind");
    }

    /// A question as the proxy encodes it, with `id`.
    fn asking(id: u16, name: u8) -> Vec<u8> {
        [&id.to_be_bytes()[..], &[1, 0, 0, 1, 0, 0, 0, 0, 0, 0], &[1, name, 0, 0, 1, 0, 1]].concat()
    }

    /// Takes one query off `upstream` and answers it (the answer is the
    /// query with QR set and the upstream's marker byte appended).
    async fn answer_one(upstream: &tokio::net::UdpSocket) -> Vec<u8> {
        let mut buf = [0u8; 512];
        let (n, from) = upstream.recv_from(&mut buf).await.unwrap();
        let mut answer = buf[..n].to_vec();
        answer[2] |= 0x80;
        answer.push(0xAA);
        upstream.send_to(&answer, from).await.unwrap();
        buf[..n].to_vec()
    }

    fn spawn_forward(client: &Arc<UpstreamClient>, addr: SocketAddr, id: u16, name: u8) -> tokio::task::JoinHandle<Result<Vec<u8>, UpstreamError>> {
        let client = client.clone();
        tokio::spawn(async move { client.forward(addr, &asking(id, name), Duration::from_secs(10)).await })
    }

    /// A fake upstream on loopback, its address, and a client.
    async fn upstream_and_client() -> (tokio::net::UdpSocket, SocketAddr, Arc<UpstreamClient>) {
        let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = upstream.local_addr().unwrap();
        (upstream, addr, Arc::new(UpstreamClient::default()))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn answers_are_taken_in_on_the_runtime_named_and_reach_callers_elsewhere() {
        let (upstream, addr, _) = upstream_and_client().await;
        let dns_thread = crate::util::conn_threads::ConnThreads::start(1, "test-dns").unwrap();
        let client = Arc::new(UpstreamClient::default().receiving_on(dns_thread.handle()));
        // Asked from this test's own runtime; the socket and its receiver
        // live on the other one.
        let asked = spawn_forward(&client, addr, 7, b'a');
        answer_one(&upstream).await;
        let answer = asked.await.unwrap().unwrap();
        assert_eq!(&answer[..2], &7u16.to_be_bytes(), "the caller's own id");
        assert_eq!(answer.last(), Some(&0xAA), "the upstream's answer");
        assert_eq!(dns_thread.open(), vec![0], "nothing counted on the thread");
    }

    fn waiters(client: &UpstreamClient) -> usize {
        client.in_flight.lock().unwrap().values().map(|(_, waiting)| waiting.len()).sum()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn identical_questions_in_flight_share_one_upstream_query_each_with_its_own_id() {
        let (upstream, addr, client) = upstream_and_client().await;
        let asked: Vec<_> = (1..=5u16)
            .map(|id| spawn_forward(&client, addr, id, b'a'))
            .collect();
        // A different question is never joined to it.
        let other = spawn_forward(&client, addr, 9, b'b');
        while waiters(&client) < 4 {
            tokio::task::yield_now().await;
        }
        let first = answer_one(&upstream).await;
        let second = answer_one(&upstream).await;
        let mut names = [first[13], second[13]];
        names.sort();
        assert_eq!(names, [b'a', b'b'], "one query per question upstream");
        for (id, task) in (1..=5u16).zip(asked) {
            let answer = task.await.unwrap().unwrap();
            assert_eq!(u16::from_be_bytes([answer[0], answer[1]]), id, "each asker's own id");
            assert_eq!(&answer[2..], &[&[0x81u8, 0][..], &asking(id, b'a')[4..], &[0xAA]].concat()[..]);
        }
        assert_eq!(other.await.unwrap().unwrap()[13], b'b');
        assert!(client.in_flight.lock().unwrap().is_empty(), "nothing left in flight");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn when_the_query_asking_upstream_goes_the_ones_waiting_ask_on_their_own() {
        let (upstream, addr, client) = upstream_and_client().await;
        let leader = spawn_forward(&client, addr, 1, b'a');
        let waiting = spawn_forward(&client, addr, 2, b'a');
        while waiters(&client) < 1 {
            tokio::task::yield_now().await;
        }
        // The first query reaches the upstream, then its asker is gone.
        let mut buf = [0u8; 512];
        upstream.recv_from(&mut buf).await.unwrap();
        leader.abort();
        let _ = leader.await;
        // The waiting one asks again itself, and gets its answer.
        answer_one(&upstream).await;
        let answer = waiting.await.unwrap().unwrap();
        assert_eq!((u16::from_be_bytes([answer[0], answer[1]]), answer.last().copied()), (2, Some(0xAA)));
        assert!(client.in_flight.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_query_long_after_an_identical_unanswered_one_asks_again_itself() {
        let (upstream, addr, client) = upstream_and_client().await;
        let first = spawn_forward(&client, addr, 1, b'a');
        // The first query reaches the upstream and is lost there.
        let mut buf = [0u8; 512];
        upstream.recv_from(&mut buf).await.unwrap();
        // A retry past the join window is a query of its own (a new id).
        tokio::time::sleep(JOIN_WITHIN + Duration::from_millis(20)).await;
        let retry = spawn_forward(&client, addr, 2, b'a');
        let again = answer_one(&upstream).await;
        assert_ne!(&again[..2], &buf[..2], "another upstream id");
        let answer = retry.await.unwrap().unwrap();
        assert_eq!(u16::from_be_bytes([answer[0], answer[1]]), 2);
        first.abort();
        let _ = first.await;
        // Sharing off: identical queries at once each go upstream.
        let alone = Arc::new(UpstreamClient::default().sharing(false));
        let asked: Vec<_> = (1..=2u16)
            .map(|id| spawn_forward(&alone, addr, id, b'c'))
            .collect();
        answer_one(&upstream).await;
        answer_one(&upstream).await;
        for (id, task) in (1..=2u16).zip(asked) {
            assert_eq!(task.await.unwrap().unwrap()[..2], id.to_be_bytes());
        }
        assert!(alone.in_flight.lock().unwrap().is_empty());
    }
}
