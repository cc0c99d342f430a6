//! `moectl plan` on both test models predicts the weight bytes llama.cpp then loads (CPU build).

use std::process::Command;

use moe_e2e::{Etcd, Worker, WorkerSpec, bin, smollm2_moe, tiny_moe};

/// Bytes from `moectl plan`'s "weights 235.4 MiB" or a table cell such as "12.0 MiB".
fn parse_size(value: &str, unit: &str) -> f64 {
    let v: f64 = value.parse().expect("number");
    let scale = match unit.trim_end_matches([',', ')']) {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        u => panic!("unit {u}"),
    };
    v * scale
}

struct Planned {
    weights: f64,
    /// (profile, n_cpu_moe, GPU weights, host experts) per row.
    rows: Vec<(String, u32, f64, f64)>,
}

fn moectl_plan(model: &std::path::Path) -> Planned {
    let out = Command::new(bin("moectl"))
        .arg("plan")
        .arg(model)
        .args(["--ctx", "2048", "--parallel", "4"])
        .output()
        .expect("run moectl plan");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let words: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    let at = words.iter().position(|w| *w == "weights").expect("weights");
    let weights = parse_size(words[at + 1], words[at + 2]);
    let rows = text
        .lines()
        .skip(2)
        .filter(|l| !l.starts_with("host memory"))
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (
                c[0].to_string(),
                c[1].parse().unwrap(),
                parse_size(c[2], c[3]),
                parse_size(c[6], c[7]),
            )
        })
        .collect();
    Planned { weights, rows }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moectl_plan_predicts_what_loading_takes_on_both_test_models() {
    let etcd = Etcd::start().await;
    let prefix = "/t-plan";
    for (id, model) in [("tiny", tiny_moe()), ("smol", smollm2_moe())] {
        let planned = moectl_plan(&model);
        // Fewer host experts, more accelerator weights; never more than the file holds.
        let gpu = |name: &str| planned.rows.iter().find(|r| r.0 == name).unwrap().2;
        assert!(gpu("cpu-moe") < gpu("full"), "{id}");
        for (profile, _, gpu, host) in &planned.rows {
            assert!(
                gpu + host <= planned.weights * 1.01,
                "{id} {profile}: {gpu} + {host} vs {}",
                planned.weights
            );
        }
        let cpu_moe = planned.rows.iter().find(|r| r.0 == "cpu-moe").unwrap();
        assert!(cpu_moe.3 > 0.0 && cpu_moe.2 < planned.weights);
        let worker = Worker::start(
            WorkerSpec::new(id, "cpu-moe").with_model(model.clone()),
            Some((&etcd, prefix)),
        )
        .await;
        let advert = etcd.advert(prefix, id).await.expect("advert");
        let loaded = advert.model.weight_bytes as f64;
        assert!(
            (planned.weights - loaded).abs() / loaded < 0.05,
            "{id}: moectl plan says {} bytes, llama.cpp loaded {loaded}",
            planned.weights
        );
        // The host experts moectl predicts for cpu-moe are what the worker keeps on the host.
        let host = advert.memory.host_expert_bytes as f64;
        assert!(
            (cpu_moe.3 - host).abs() / host < 0.01,
            "{id}: host experts {} vs {host}",
            cpu_moe.3
        );
        worker.stop().await;
    }
}
