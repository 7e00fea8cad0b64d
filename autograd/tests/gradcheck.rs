//! Every op against central finite differences in f64, at small odd shapes.

mod common;

use common::{gradcheck, randn, randn_away_from_zero};
use lathe_autograd::{AttentionPath, IGNORE_INDEX, LAYERNORM_EPS, Tape, Tensor, Var};
use lathe_kernels::rng::Rng;

fn rng() -> Rng {
    Rng::new(42)
}

#[test]
fn matmul_2d_all_transposes() {
    let mut r = rng();
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = randn(&mut r, if ta { &[5, 3] } else { &[3, 5] });
        let b = randn(&mut r, if tb { &[7, 5] } else { &[5, 7] });
        gradcheck("matmul", vec![a, b], |t, v| t.matmul(v[0], v[1], ta, tb));
    }
}

#[test]
fn matmul_batched_shared_and_batched_rhs() {
    let mut r = rng();
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = randn(&mut r, if ta { &[2, 5, 3] } else { &[2, 3, 5] });
        let shared = randn(&mut r, if tb { &[7, 5] } else { &[5, 7] });
        gradcheck("matmul shared rhs", vec![a.clone(), shared], |t, v| {
            t.matmul(v[0], v[1], ta, tb)
        });
        let batched = randn(&mut r, if tb { &[2, 7, 5] } else { &[2, 5, 7] });
        gradcheck("matmul batched rhs", vec![a, batched], |t, v| {
            t.matmul(v[0], v[1], ta, tb)
        });
    }
}

#[test]
fn matmul_shape_errors_are_reported() {
    let mut t = Tape::<f64>::with_dtype(lathe_autograd::DType::F32);
    let a = t.input(Tensor::zeros([3, 5], Default::default())).unwrap();
    let b = t.input(Tensor::zeros([4, 7], Default::default())).unwrap();
    let e = t.matmul(a, b, false, false).unwrap_err().to_string();
    assert!(e.contains("matmul") && e.contains("inner dims"), "{e}");
}

#[test]
fn linear_with_and_without_bias() {
    let mut r = rng();
    let x = randn(&mut r, &[3, 5, 7]);
    let w = randn(&mut r, &[7, 4]);
    let b = randn(&mut r, &[4]);
    gradcheck("linear+bias", vec![x.clone(), w.clone(), b], |t, v| {
        t.linear(v[0], v[1], Some(v[2]))
    });
    gradcheck("linear", vec![x, w], |t, v| t.linear(v[0], v[1], None));
}

#[test]
fn elementwise_ops() {
    let mut r = rng();
    let a = randn(&mut r, &[3, 5, 7]);
    let b = randn(&mut r, &[3, 5, 7]);
    gradcheck("add", vec![a.clone(), b.clone()], |t, v| t.add(v[0], v[1]));
    gradcheck("mul", vec![a.clone(), b], |t, v| t.mul(v[0], v[1]));
    gradcheck("mul self", vec![a.clone()], |t, v| t.mul(v[0], v[0]));
    gradcheck("scale", vec![a.clone()], |t, v| t.scale(v[0], -1.7));
    let bias2 = randn(&mut r, &[5, 7]);
    gradcheck("bias_add (5,7)", vec![a.clone(), bias2], |t, v| {
        t.bias_add(v[0], v[1])
    });
    let bias1 = randn(&mut r, &[7]);
    gradcheck("bias_add (7)", vec![a.clone(), bias1], |t, v| {
        t.bias_add(v[0], v[1])
    });
    gradcheck("gelu", vec![a], |t, v| t.gelu(v[0]));
    let away = randn_away_from_zero(&mut r, &[3, 5, 7], 1e-3);
    gradcheck("relu", vec![away], |t, v| t.relu(v[0]));
}

#[test]
fn layernorm_and_softmax() {
    let mut r = rng();
    let x = randn(&mut r, &[3, 5, 7]);
    let w = randn(&mut r, &[7]);
    let b = randn(&mut r, &[7]);
    gradcheck("layernorm", vec![x.clone(), w, b], |t, v| {
        t.layernorm(v[0], v[1], v[2], LAYERNORM_EPS)
    });
    gradcheck("softmax", vec![x], |t, v| t.softmax(v[0]));
}

#[test]
fn layernorm_statistics_are_saved() {
    let x =
        Tensor::<f64>::from_vec([2, 4], vec![1.0, 2.0, 3.0, 4.0, -1.0, -1.0, 1.0, 1.0]).unwrap();
    let mut t = Tape::<f64>::with_dtype(Default::default());
    let x = t.input(x).unwrap();
    let w = t
        .input(Tensor::from_vec([4], vec![1.0; 4]).unwrap())
        .unwrap();
    let b = t
        .input(Tensor::from_vec([4], vec![0.0; 4]).unwrap())
        .unwrap();
    let (y, mean, rstd) = t.layernorm_stats(x, w, b, 1e-5).unwrap();
    assert_eq!(t.value(mean).unwrap(), &[2.5, 0.0]);
    let rs = t.value(rstd).unwrap();
    assert!((rs[0] - 1.0 / (1.25f64 + 1e-5).sqrt()).abs() < 1e-12);
    assert!((rs[1] - 1.0 / (1.0f64 + 1e-5).sqrt()).abs() < 1e-12);
    let yv = t.value(y).unwrap();
    assert!(yv[..4].iter().sum::<f64>().abs() < 1e-12);
}

#[test]
fn causal_attention() {
    let mut r = rng();
    // B = 3, T = 5, C = 6, two heads of 3.
    let qkv = randn(&mut r, &[3, 5, 18]);
    gradcheck("attention", vec![qkv.clone()], |t, v| t.attention(v[0], 2));
    // Longer than one causal row block (32): blocks of 32 and 5 rows.
    let long = randn(&mut r, &[1, 37, 12]);
    gradcheck("attention, two row blocks", vec![long], |t, v| {
        t.attention(v[0], 2)
    });
    // Causality: changing the last position's keys/values does not change earlier outputs.
    let mut t = Tape::<f64>::with_dtype(Default::default());
    let a = t.input(qkv.clone()).unwrap();
    let o1 = t.attention(a, 2).unwrap();
    let mut data = qkv.data().to_vec();
    for j in 6..18 {
        data[4 * 18 + j] += 1.0;
    }
    let b = t
        .input(Tensor::from_vec([3, 5, 18], data).unwrap())
        .unwrap();
    let o2 = t.attention(b, 2).unwrap();
    let (v1, v2) = (t.value(o1).unwrap(), t.value(o2).unwrap());
    assert_eq!(
        v1[..4 * 6],
        v2[..4 * 6],
        "positions before the change must not move"
    );
    assert_ne!(v1[4 * 6..5 * 6], v2[4 * 6..5 * 6]);
}

#[test]
fn flash_attention_path() {
    let mut r = rng();
    let flash = |t: &mut Tape<f64>, v: &[Var]| {
        t.set_attention_path(AttentionPath::Flash);
        t.attention(v[0], 2)
    };
    let qkv = randn(&mut r, &[2, 5, 12]);
    gradcheck("flash attention", vec![qkv.clone()], flash);
    let long = randn(&mut r, &[1, 37, 12]);
    gradcheck("flash attention, two row blocks", vec![long.clone()], flash);
    // On the CPU both paths compute the same bits (values and gradients), in f32 storage and
    // with bf16 rounding of the probabilities.
    for dt in [lathe_autograd::DType::F32, lathe_autograd::DType::BF16] {
        let run = |path: AttentionPath| {
            let mut t = Tape::<f64>::with_dtype(dt);
            t.set_attention_path(path);
            let x = t.leaf(long.clone(), true).unwrap();
            let y = t.attention(x, 2).unwrap();
            let w = t.input(randn(&mut rng(), &[1, 37, 4])).unwrap();
            let p = t.mul(y, w).unwrap();
            let l = t.sum(p).unwrap();
            let yv = t.value(y).unwrap().to_vec();
            t.backward_leaves(l, 1.0).unwrap();
            (yv, t.grad(x).unwrap().unwrap().to_vec())
        };
        let (a, b) = (run(AttentionPath::Materialized), run(AttentionPath::Flash));
        assert_eq!(a.0, b.0, "{dt:?} values");
        assert_eq!(a.1, b.1, "{dt:?} gradients");
    }
}

#[test]
fn attention_matches_composed_primitives() {
    // Single head: softmax(mask(Q K^T / sqrt(hs))) V, built from matmul/softmax on a T = 1 prefix
    // window per row, compared with the fused op.
    let mut r = rng();
    let (tt, hs) = (5, 4);
    let qkv = randn(&mut r, &[1, tt, 3 * hs]);
    let mut t = Tape::<f64>::with_dtype(Default::default());
    let x = t.input(qkv.clone()).unwrap();
    let fused = t.attention(x, 1).unwrap();
    let fused = t.value(fused).unwrap().to_vec();
    let d = qkv.data();
    for i in 0..tt {
        let mut s: Vec<f64> = (0..=i)
            .map(|j| {
                (0..hs)
                    .map(|k| d[i * 3 * hs + k] * d[j * 3 * hs + hs + k])
                    .sum::<f64>()
                    / (hs as f64).sqrt()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        s.iter_mut().for_each(|x| *x = (*x - m).exp() / z);
        for k in 0..hs {
            let o: f64 = (0..=i).map(|j| s[j] * d[j * 3 * hs + 2 * hs + k]).sum();
            assert!((o - fused[i * hs + k]).abs() < 1e-12);
        }
    }
}

#[test]
fn embedding_scatter_add() {
    let mut r = rng();
    let table = randn(&mut r, &[7, 5]);
    let ids = [3u32, 1, 3, 0, 6, 3, 1, 2, 2, 5, 4, 0];
    gradcheck("embedding", vec![table], |t, v| {
        t.embedding(v[0], &ids, &[3, 4])
    });
    let mut t = Tape::<f64>::with_dtype(Default::default());
    let tab = t.input(randn(&mut r, &[7, 5])).unwrap();
    let e = t.embedding(tab, &[7], &[1]).unwrap_err().to_string();
    assert!(e.contains("position 0") && e.contains("7"), "{e}");
}

#[test]
fn cross_entropy_with_padding_and_ignore() {
    let mut r = rng();
    let logits = randn(&mut r, &[3, 5, 7]);
    let mut targets: Vec<u32> = (0..15).map(|i| (i * 3 % 5) as u32).collect();
    targets[4] = IGNORE_INDEX;
    targets[11] = IGNORE_INDEX;
    // vocab 5 of a padded width 7.
    gradcheck("cross_entropy", vec![logits.clone()], |t, v| {
        t.cross_entropy(v[0], &targets, 5, IGNORE_INDEX)
    });

    let mut t = Tape::<f64>::with_dtype(Default::default());
    let l = t.leaf(logits.clone(), true).unwrap();
    let loss = t.cross_entropy(l, &targets, 5, IGNORE_INDEX).unwrap();
    // Reference loss in plain f64.
    let d = logits.data();
    let mut total = 0.0;
    for (row, &tg) in targets.iter().enumerate() {
        if tg == IGNORE_INDEX {
            continue;
        }
        let x = &d[row * 7..row * 7 + 5];
        let m = x.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        total += lse - x[tg as usize];
    }
    assert!((t.scalar(loss).unwrap() - total / 13.0).abs() < 1e-12);
    t.backward_leaves(loss, 1.0).unwrap();
    let g = t.grad(l).unwrap().unwrap();
    for row in 0..15 {
        assert_eq!(
            &g[row * 7 + 5..row * 7 + 7],
            &[0.0, 0.0],
            "padding columns get no gradient"
        );
        if targets[row] == IGNORE_INDEX {
            assert!(
                g[row * 7..row * 7 + 7].iter().all(|&x| x == 0.0),
                "ignored row {row}"
            );
        }
    }
    let mut t = Tape::<f64>::with_dtype(Default::default());
    let l = t.input(logits).unwrap();
    let mut bad = targets.clone();
    bad[2] = 5;
    let e = t
        .cross_entropy(l, &bad, 5, IGNORE_INDEX)
        .unwrap_err()
        .to_string();
    assert!(e.contains("position 2"), "{e}");
}

#[test]
fn movement_and_reductions() {
    let mut r = rng();
    let x = randn(&mut r, &[3, 5, 7]);
    gradcheck("reshape", vec![x.clone()], |t, v| t.reshape(v[0], &[5, 21]));
    gradcheck("transpose 0,2", vec![x.clone()], |t, v| {
        t.transpose(v[0], 0, 2)
    });
    gradcheck("transpose 2,1", vec![x.clone()], |t, v| {
        t.transpose(v[0], 2, 1)
    });
    gradcheck("split", vec![x.clone()], |t, v| {
        let parts = t.split(v[0], 1, &[2, 3])?;
        // Use both pieces, in swapped order, so both gradients flow.
        t.concat(&[parts[1], parts[0]], 1)
    });
    gradcheck("split one piece", vec![x.clone()], |t, v| {
        Ok(t.split(v[0], 2, &[3, 1, 3])?[1])
    });
    let y = randn(&mut r, &[3, 2, 7]);
    gradcheck("concat", vec![x.clone(), y], |t, v| {
        t.concat(&[v[0], v[1]], 1)
    });
    gradcheck("sum", vec![x.clone()], |t, v| t.sum(v[0]));
    gradcheck("mean", vec![x.clone()], |t, v| t.mean(v[0]));

    let mut t = Tape::<f64>::with_dtype(Default::default());
    let a = t.input(x.clone()).unwrap();
    let tr = t.transpose(a, 0, 2).unwrap();
    assert_eq!(t.shape(tr).unwrap(), &[7, 5, 3]);
    let tv = t.value(tr).unwrap();
    // out[k, j, i] == in[i, j, k]
    assert_eq!(tv[(4 * 5 + 2) * 3 + 1], x.data()[(5 + 2) * 7 + 4]);
    assert!(t.reshape(a, &[4, 4]).is_err());
}

#[test]
fn composite_chain_through_every_kind_of_op() {
    // A small network mixing ops, checked end to end (gradients through several consumers).
    let mut r = rng();
    let x = randn(&mut r, &[3, 5, 6]);
    let w = randn(&mut r, &[6, 18]);
    let lw = randn(&mut r, &[6]);
    let lb = randn(&mut r, &[6]);
    gradcheck("composite", vec![x, w, lw, lb], |t, v| {
        let h = t.layernorm(v[0], v[2], v[3], 1e-5)?;
        let qkv = t.linear(h, v[1], None)?;
        let a = t.attention(qkv, 3)?;
        let g = t.gelu(a)?;
        let s = t.add(g, v[0])?;
        let m: Var = t.mul(s, h)?;
        t.softmax(m)
    });
}
