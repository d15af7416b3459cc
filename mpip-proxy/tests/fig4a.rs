//! Fig. 4a in network namespaces: two paths limited by HTB to 40 and 20
//! Mbit/s, a download through the MPIP proxy end's HTTP proxy. A test binary
//! of its own, so no other test runs beside this measurement.

mod common;

use std::time::Duration;

use common::*;

/// Fig. 4a: 40 + 20 Mbit/s paths, a 64 MiB download through the MPIP proxy
/// end's HTTP proxy. The file must be intact and the aggregate goodput, per
/// second from the 2nd second on (after TCP start-up and Algorithm 1 moving
/// the weights from 1:1 towards 2:1), at least 90% of 60 Mbit/s at the median.
///
/// How much room there is: HTB counts whole Ethernet frames. With the inner
/// IPv4 header compressed to its TTL a 1495-byte frame carries 1395 bytes of
/// TCP payload, so the ceiling is 93.3% of the rate (plain TCP: 95.6%). Measured
/// here: 91.6-92.7% (runs of this test, alone on a 2-core VM; one run of ten
/// had a stall that put its mean at 89.9%).
#[test]
fn fig4a_aggregate_of_htb_limited_paths() {
    let Some((lab, file, out, mut curl)) = shaped_download(40, 20, 64 << 20, 0x4a) else {
        return;
    };
    let samples = watch_download(&out, &mut curl, Duration::from_secs(90));
    let received = std::fs::read(&out).expect("downloaded file");
    assert_eq!(received.len(), file.len(), "whole file");
    assert!(sha256(&received) == sha256(&file), "file intact");

    // Rates per second of transfer (about 10 samples each), leaving out the
    // last, partial one.
    let complete = &samples[..samples.len() - 1];
    let per_second: Vec<(f64, f64)> = complete
        .windows(11)
        .step_by(10)
        .map(|w| {
            let mbit = (w[10].1 - w[0].1) as f64 * 8.0 / (w[10].0 - w[0].0) / 1e6;
            (w[0].0, mbit)
        })
        .collect();
    let shown: Vec<String> = per_second.iter().map(|(_, r)| format!("{r:.1}")).collect();
    eprintln!("fig4a per second: {}", shown.join(" "));
    // Steady state: the seconds from the 2nd on. The median, so one stall of
    // this shared VM does not decide; the mean is printed beside it.
    let mut steady: Vec<f64> = per_second
        .iter()
        .filter(|(t, _)| *t >= 2.0)
        .map(|(_, r)| *r)
        .collect();
    assert!(
        steady.len() >= 5,
        "a transfer of at least 7 s: {per_second:?}"
    );
    steady.sort_by(f64::total_cmp);
    let median_mbit = steady[steady.len() / 2];
    let mean_mbit = steady.iter().sum::<f64>() / steady.len() as f64;
    let (total_time, _) = samples[samples.len() - 1];
    let average_mbit = file.len() as f64 * 8.0 / total_time / 1e6;
    let p1 = lab.proxy_path_tx_bytes("p1");
    let p2 = lab.proxy_path_tx_bytes("p2");
    eprintln!(
        "fig4a: steady median {median_mbit:.1} Mbit/s ({:.1}% of 60), mean {mean_mbit:.1}; \
         whole transfer {average_mbit:.1} Mbit/s; path bytes p1 {p1} p2 {p2} ({:.2}:1)",
        median_mbit / 60.0 * 100.0,
        p1 as f64 / p2.max(1) as f64
    );
    assert!(
        median_mbit >= 0.9 * 60.0,
        "aggregate {median_mbit:.1} Mbit/s is below 90% of 60 Mbit/s\n{}",
        lab.logs()
    );
    assert!(p2 > file.len() as u64 / 5, "path 2 carried its share: {p2}");
}
