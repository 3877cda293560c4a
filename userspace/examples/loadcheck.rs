fn main() {
    let dp = sbx_net::Datapath::load(&Default::default()).unwrap();
    for et in [[0x08u8, 0x00], [0x86, 0xdd], [0x88, 0xcc]] {
        for len in [14usize, 15, 20, 26, 33, 34, 40, 53, 54, 60] {
            let mut f = vec![0u8; len];
            f[12] = et[0]; f[13] = et[1];
            if len > 14 { f[14] = if et[0] == 0x86 { 0x60 } else { 0x45 }; }
            let r = dp.test_run("sbx_egress", &f, 1, 1);
            println!("{et:?} {len}: {:?}", r.map(|x| x.0).map_err(|e| format!("{e:?}").chars().take(60).collect::<String>()));
        }
    }
}
