//! A small simulated cluster: prefix affinity finds conversations in worker caches far more
//! often than the default policy, with one gateway and with four, without piling load up.

use moe_sim::{
    AdvertFreeKv, ClassShape, ClusterModel, FrontModel, PolicyKind, ProfileModel, QueueDiscipline,
    SimConfig, Workload, micros, run,
};

fn config(gateways: usize) -> SimConfig {
    SimConfig {
        seed: 3,
        cluster: ClusterModel {
            workers: 40,
            full_fraction: 0.3,
            full: ProfileModel::full(),
            cpu_moe: ProfileModel::cpu_moe(),
            queue: QueueDiscipline::Fifo,
            max_queue: 256,
            churn_per_minute: 0.0,
            advert_interval: 250_000,
            advert_free_kv: AdvertFreeKv::Unclaimed,
            prefix_cache: 16,
        },
        front: FrontModel {
            gateways,
            max_attempts: 3,
            client_retries: 30,
            client_backoff: 1_000_000,
            sample_k: 4,
        },
        workload: Workload {
            rate: 15.0,
            duration: micros(40.0),
            interactive_fraction: 0.3,
            interactive: ClassShape {
                prompt_min: 200,
                prompt_max: 1000,
                max_tokens: 128,
            },
            batch: ClassShape {
                prompt_min: 500,
                prompt_max: 2000,
                max_tokens: 256,
            },
            conversations: 100,
            prefix_share: 0.8,
        },
        warmup: micros(15.0),
        drain: micros(300.0),
    }
}

#[test]
fn prefix_affinity_raises_cache_hits_with_one_and_four_gateways() {
    for gateways in [1, 4] {
        let report = run(&config(gateways), &[PolicyKind::Ours, PolicyKind::Prefix]);
        let hits = |p: usize| {
            let r = &report.policies[p];
            (r.interactive.prefix_hits + r.batch.prefix_hits) as f64
                / (r.interactive.requests + r.batch.requests).max(1) as f64
        };
        let (ours, prefix) = (hits(0), hits(1));
        assert!(
            prefix > 0.6 && prefix > 2.0 * ours,
            "{gateways} gateway(s): prefix hit rate {prefix:.2}, ours {ours:.2}"
        );
        let p = &report.policies[1];
        assert_eq!(p.interactive.violations + p.batch.violations, 0);
        assert_eq!(p.interactive.failed + p.batch.failed, 0);
    }
}
