//! The cost of one DPoP proof (RFC 9449) as the proxy signs it per request:
//! `ProofKey::proof` with a generated key, the claims of a proxied request
//! (`htm`, `htu`, `iat`, `ath` of a 900-byte token, no nonce), reused
//! buffers. Used by `bench/run.sh dpop`.
//!
//!     dpop_sign [ES256|EdDSA] [proofs per repetition] [repetitions]
//!
//! Prints one JSON line: µs per proof for each repetition, by the wall
//! clock and by the CPU time of this thread (`/proc/thread-self/schedstat`,
//! which leaves out time spent waiting for the CPU on a busy machine, and
//! counts the kernel's share: `getrandom`), and their medians. Under `valgrind --tool=callgrind --collect-atstart=no
//! --toggle-collect='*sign_n*'` only the proofs are counted: instructions
//! ÷ (proofs × repetitions) is the user-space cost of one proof.

use std::time::Instant;

use token_injector::dpop::{Claims, ProofKey, ath};
use token_injector::keys::Alg;

/// `n` proofs; not inlined, so callgrind can collect this alone.
#[inline(never)]
fn sign_n(key: &ProofKey, claims: &Claims<'_>, n: u64, out: &mut String, scratch: &mut String) {
    for _ in 0..n {
        key.proof(out, claims, scratch).expect("signing");
        std::hint::black_box(&*out);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let alg = match args.next().as_deref().unwrap_or("ES256") {
        "ES256" => Alg::ES256,
        "EdDSA" => Alg::EdDSA,
        other => panic!("algorithm {other}: ES256 or EdDSA"),
    };
    let n: u64 = args.next().map_or(20_000, |s| s.parse().expect("proofs"));
    let reps: usize = args.next().map_or(5, |s| s.parse().expect("repetitions"));
    let key = ProofKey::generate_for(alg).expect("key");
    let token = "t".repeat(900);
    let ath = ath(token.as_bytes());
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = Claims {
        htm: "GET",
        htu: "https://localhost:18447/1k",
        iat,
        ath: Some(&ath),
        nonce: None,
    };
    let (mut out, mut scratch) = (String::new(), String::new());
    // Warm the buffers (and the caches) first.
    key.proof(&mut out, &claims, &mut scratch).expect("signing");
    let proof_bytes = out.len();
    let (mut wall, mut cpu) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for _ in 0..reps {
        let (t, c) = (Instant::now(), cpu_ns());
        sign_n(&key, &claims, n, &mut out, &mut scratch);
        wall.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
        cpu.push((cpu_ns() - c) as f64 / 1e3 / n as f64);
    }
    println!(
        r#"{{"alg":"{}","proofs":{},"repetitions":{},"proof_bytes":{},"us_per_proof":[{}],"us_per_proof_median":{:.2},"cpu_us_per_proof":[{}],"cpu_us_per_proof_median":{:.2}}}"#,
        alg.as_str(),
        n,
        reps,
        proof_bytes,
        list(&wall),
        median(&wall),
        list(&cpu),
        median(&cpu),
    );
}

/// Nanoseconds this thread has run on a CPU (user and kernel).
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/thread-self/schedstat")
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|u| format!("{u:.2}"))
        .collect::<Vec<_>>()
        .join(",")
}
