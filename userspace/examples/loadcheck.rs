fn main() {
    match sbx_net::Datapath::load(&Default::default()) {
        Ok(_) => println!("loaded OK"),
        Err(e) => { let mut s: &dyn std::error::Error = &e; println!("{s}"); while let Some(src) = s.source() { println!("  caused by: {src}"); s = src; } }
    }
}
