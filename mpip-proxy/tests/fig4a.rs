//! Fig. 4a in network namespaces: two paths limited by HTB to 40 and 20
//! Mbit/s, a download through the MPIP proxy end's HTTP proxy. A test binary
//! of its own, so no other test of this crate runs beside this measurement.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// Microseconds some task of this machine waited for a CPU (PSI, "some"
/// line of `/proc/pressure/cpu`); `None` without PSI.
fn cpu_pressure_us() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    let some = text.lines().find(|l| l.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?
        .parse()
        .ok()
}

/// One download's steady aggregate: the median and the mean of the per-second
/// rates from the 2nd second on (after TCP start-up and Algorithm 1 moving
/// the weights from 1:1 towards 2:1), in Mbit/s, and the share of its wall
/// time in which some task of the machine waited for a CPU.
struct Attempt {
    median_mbit: f64,
    mean_mbit: f64,
    cpu_pressure: Option<f64>,
}

fn download(lab: &MpipLab, file: &[u8], out: &Path, mut curl: testbed::Background) -> Attempt {
    let pressure_before = cpu_pressure_us();
    let samples = watch_download(out, &mut curl, Duration::from_secs(90));
    let pressure_after = cpu_pressure_us();
    let received = std::fs::read(out).expect("downloaded file");
    assert_eq!(received.len(), file.len(), "whole file");
    assert!(sha256(&received) == sha256(file), "file intact");
    let _ = std::fs::remove_file(out);
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
    let mut steady: Vec<f64> = per_second
        .iter()
        .filter(|(t, _)| *t >= 2.0)
        .map(|(_, r)| *r)
        .collect();
    assert!(
        steady.len() >= 5,
        "a transfer of at least 7 s: {per_second:?}\n{}",
        lab.logs()
    );
    steady.sort_by(f64::total_cmp);
    let (total_time, _) = samples[samples.len() - 1];
    let cpu_pressure = pressure_before
        .zip(pressure_after)
        .map(|(before, after)| after.saturating_sub(before) as f64 / 1e6 / total_time);
    Attempt {
        median_mbit: steady[steady.len() / 2],
        mean_mbit: steady.iter().sum::<f64>() / steady.len() as f64,
        cpu_pressure,
    }
}

/// Fig. 4a: 40 + 20 Mbit/s paths, 64 MiB downloads through the MPIP proxy
/// end's HTTP proxy. Every file must be intact, and every download must
/// aggregate: its steady median above 44 Mbit/s, 1.1 times what the faster
/// path alone carries. The target, a steady median of at least 90% of
/// 60 Mbit/s, must be reached by one of up to three downloads (the median,
/// so one stall of a shared VM does not decide; the mean is printed beside
/// it); a download that misses it while tasks waited for a CPU more than
/// half of the time (PSI, `/proc/pressure/cpu`: the user-space tunnel
/// starves, not MPIP's scheduling) does not count against it, and if all
/// three were starved the test says so and passes on the aggregation check
/// alone. The bench (`bench.py mpip`) reports throughput against the direct
/// path in the same run.
///
/// How much room there is: HTB counts whole Ethernet frames. With the inner
/// IPv4 header compressed to its TTL a 1495-byte frame carries 1395 bytes of
/// TCP payload, so the ceiling is 93.3% of the rate (plain TCP: 95.6%). Measured
/// here: 91.6-92.7% (runs of this test, alone on a 2-core VM; one run of ten
/// had a stall that put its mean at 89.9%).
#[test]
fn fig4a_aggregate_of_htb_limited_paths() {
    const TARGET_MBIT: f64 = 0.9 * 60.0;
    const AGGREGATION_FLOOR_MBIT: f64 = 1.1 * 40.0;
    const STARVED: f64 = 0.5;
    let Some((lab, file, out, curl)) = shaped_download(40, 20, 64 << 20, 0x4a) else {
        return;
    };
    let mut curl = Some(curl);
    let mut starved_misses = 0;
    for attempt in 1..=3 {
        let curl = curl.take().unwrap_or_else(|| {
            let url = format!("http://{SERVER}/big.bin");
            lab.curl_background(&out, &["-x", PROXY_HTTP, &url])
        });
        let p1_before = lab.proxy_path_tx_bytes("p1");
        let p2_before = lab.proxy_path_tx_bytes("p2");
        let run = download(&lab, &file, &out, curl);
        let p1 = lab.proxy_path_tx_bytes("p1") - p1_before;
        let p2 = lab.proxy_path_tx_bytes("p2") - p2_before;
        let pressure = run
            .cpu_pressure
            .map_or("no PSI".to_owned(), |p| format!("{:.0}%", p * 100.0));
        eprintln!(
            "fig4a attempt {attempt}: steady median {:.1} Mbit/s ({:.1}% of 60), mean {:.1}; \
             path bytes p1 {p1} p2 {p2} ({:.2}:1); tasks waiting for a CPU {pressure} of the time",
            run.median_mbit,
            run.median_mbit / 60.0 * 100.0,
            run.mean_mbit,
            p1 as f64 / p2.max(1) as f64
        );
        assert!(p2 > file.len() as u64 / 5, "path 2 carried its share: {p2}");
        assert!(
            run.median_mbit >= AGGREGATION_FLOOR_MBIT,
            "aggregate {:.1} Mbit/s is not above the faster path's 40 Mbit/s \
             (CPU pressure {pressure})\n{}",
            run.median_mbit,
            lab.logs()
        );
        if run.median_mbit >= TARGET_MBIT {
            return;
        }
        if run.cpu_pressure.is_some_and(|p| p > STARVED) {
            starved_misses += 1;
        }
    }
    assert_eq!(
        starved_misses,
        3,
        "no download reached 90% of 60 Mbit/s, and not all of them were starved of CPU\n{}",
        lab.logs()
    );
    eprintln!(
        "fig4a: the 90% target was not measurable (every attempt starved of CPU); \
         aggregation above the faster path held"
    );
}
