//! Instruction families on one warp against Rust-computed expectations. Inputs are random
//! (never zero unless a lane is chosen to test a special case); outputs start as NaN bits.

// Lane-indexed loops and the comparison table mirror the ISA's wording (lane l, `!(a >= b)`
// for the unordered forms), which reads better here than iterator chains.
#![allow(
    clippy::type_complexity,
    clippy::neg_cmp_op_on_partial_ord,
    clippy::needless_range_loop,
    clippy::nonminimal_bool
)]

mod common;
use common::*;
use half::{bf16, f16};
use lathe_sim::{Launch, Param};

/// Runs `body` on one warp. Registers on entry: `%r2, %r3, %r4` = a, b, c (u32 inputs of the
/// lane), `%rd2` = a | b << 32, `%rd3` = c | a << 32, `%f2, %f3, %f4` = a, b, c as f32 bits,
/// `%r1` = lane. The body leaves its result in `%rd10`, which is stored per lane.
fn run(body: &str, inputs: &[[u32; 3]; 32]) -> Vec<u64> {
    let ptx = format!(
        ".version 8.0
.target sm_80
.address_size 64
.visible .entry k(.param .u64 pa, .param .u64 pb)
{{
.reg .b32 %r<32>;
.reg .b64 %rd<32>;
.reg .f32 %f<32>;
.reg .f64 %fd<8>;
.reg .b16 %h<8>;
.reg .pred %p<8>;
.shared .align 16 .b8 sm[2048];
ld.param.u64 %rd0, [pa]; ld.param.u64 %rd1, [pb]; mov.u32 %r1, %laneid;
mul.wide.u32 %rd4, %r1, 4; add.u64 %rd4, %rd4, %rd0;
ld.global.u32 %r2, [%rd4]; ld.global.u32 %r3, [%rd4+128]; ld.global.u32 %r4, [%rd4+256];
mov.b32 %f2, %r2; mov.b32 %f3, %r3; mov.b32 %f4, %r4;
mov.b64 %rd2, {{%r2, %r3}}; mov.b64 %rd3, {{%r4, %r2}};
{body}
mul.wide.u32 %rd5, %r1, 8; add.u64 %rd5, %rd5, %rd1;
st.global.u64 [%rd5], %rd10;
ret;
}}
"
    );
    let sim = sim();
    let m = sim
        .load_module(&ptx)
        .unwrap_or_else(|e| panic!("{e}\n{body}"));
    let mut words = vec![0u32; 96];
    for (l, i) in inputs.iter().enumerate() {
        words[l] = i[0];
        words[32 + l] = i[1];
        words[64 + l] = i[2];
    }
    let pa = upload_u32(&sim, &words);
    let pb = poisoned(&sim, 64);
    sim.launch(
        &m,
        "k",
        &Launch {
            grid: (1, 1, 1),
            block: (32, 1, 1),
            params: vec![Param::U64(pa), Param::U64(pb)],
            ..Launch::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{body}"));
    let w = download_u32(&sim, pb, 64);
    (0..32)
        .map(|l| w[2 * l] as u64 | (w[2 * l + 1] as u64) << 32)
        .collect()
}

fn ints(seed: u64) -> [[u32; 3]; 32] {
    let mut r = Rng::new(seed);
    let mut v = [[0u32; 3]; 32];
    for (l, x) in v.iter_mut().enumerate() {
        *x = [r.u32() | 1, r.u32() | 1, r.u32() | 1];
        // Small and edge values in some lanes.
        if l % 4 == 1 {
            x[1] = (x[1] % 40) + 1;
        }
        if l == 3 {
            x[0] = 0x8000_0000;
            x[1] = 0xffff_ffff;
        }
    }
    v
}

fn check(body: &str, inputs: &[[u32; 3]; 32], f: impl Fn(u32, u32, u32) -> u64) {
    let got = run(body, inputs);
    for (l, i) in inputs.iter().enumerate() {
        assert_eq!(
            got[l],
            f(i[0], i[1], i[2]),
            "lane {l} inputs {i:x?}\n{body}"
        );
    }
}

fn u(v: u32) -> u64 {
    v as u64
}

#[test]
fn integer_arithmetic_32() {
    let x = ints(1);
    let cases: Vec<(&str, Box<dyn Fn(u32, u32, u32) -> u64>)> = vec![
        (
            "add.u32 %r10, %r2, %r3;",
            Box::new(|a, b, _| u(a.wrapping_add(b))),
        ),
        (
            "sub.s32 %r10, %r2, %r3;",
            Box::new(|a, b, _| u(a.wrapping_sub(b))),
        ),
        (
            "add.sat.s32 %r10, %r2, %r3;",
            Box::new(|a, b, _| u((a as i32).saturating_add(b as i32) as u32)),
        ),
        (
            "sub.sat.s32 %r10, %r2, %r3;",
            Box::new(|a, b, _| u((a as i32).saturating_sub(b as i32) as u32)),
        ),
        (
            "mul.lo.u32 %r10, %r2, %r3;",
            Box::new(|a, b, _| u(a.wrapping_mul(b))),
        ),
        (
            "mul.hi.u32 %r10, %r2, %r3;",
            Box::new(|a, b, _| (a as u64 * b as u64) >> 32),
        ),
        (
            "mul.hi.s32 %r10, %r2, %r3;",
            Box::new(|a, b, _| u(((a as i32 as i64 * b as i32 as i64) >> 32) as u32)),
        ),
        (
            "mad.lo.u32 %r10, %r2, %r3, %r4;",
            Box::new(|a, b, c| u(a.wrapping_mul(b).wrapping_add(c))),
        ),
        (
            "mad.hi.s32 %r10, %r2, %r3, %r4;",
            Box::new(|a, b, c| {
                u((((a as i32 as i64 * b as i32 as i64) >> 32) as u32).wrapping_add(c))
            }),
        ),
        ("div.u32 %r10, %r2, %r3;", Box::new(|a, b, _| u(a / b))),
        ("rem.u32 %r10, %r2, %r3;", Box::new(|a, b, _| u(a % b))),
        (
            "div.s32 %r10, %r2, %r3;",
            Box::new(|a, b, _| u((a as i32).wrapping_div(b as i32) as u32)),
        ),
        (
            "rem.s32 %r10, %r2, %r3;",
            Box::new(|a, b, _| u((a as i32).wrapping_rem(b as i32) as u32)),
        ),
        (
            "min.s32 %r10, %r2, %r3;",
            Box::new(|a, b, _| u((a as i32).min(b as i32) as u32)),
        ),
        (
            "max.s32 %r10, %r2, %r3;",
            Box::new(|a, b, _| u((a as i32).max(b as i32) as u32)),
        ),
        ("min.u32 %r10, %r2, %r3;", Box::new(|a, b, _| u(a.min(b)))),
        ("max.u32 %r10, %r2, %r3;", Box::new(|a, b, _| u(a.max(b)))),
        ("and.b32 %r10, %r2, %r3;", Box::new(|a, b, _| u(a & b))),
        ("or.b32 %r10, %r2, %r3;", Box::new(|a, b, _| u(a | b))),
        ("xor.b32 %r10, %r2, %r3;", Box::new(|a, b, _| u(a ^ b))),
        ("not.b32 %r10, %r2;", Box::new(|a, _, _| u(!a))),
        (
            "neg.s32 %r10, %r2;",
            Box::new(|a, _, _| u(a.wrapping_neg())),
        ),
        (
            "abs.s32 %r10, %r2;",
            Box::new(|a, _, _| u((a as i32).wrapping_abs() as u32)),
        ),
        ("popc.b32 %r10, %r2;", Box::new(|a, _, _| u(a.count_ones()))),
        (
            "clz.b32 %r10, %r2;",
            Box::new(|a, _, _| u(a.leading_zeros())),
        ),
        (
            "brev.b32 %r10, %r2;",
            Box::new(|a, _, _| u(a.reverse_bits())),
        ),
        // Shift amounts past the width clamp.
        (
            "shl.b32 %r10, %r2, %r3;",
            Box::new(|a, b, _| u(if b >= 32 { 0 } else { a << b })),
        ),
        (
            "shr.u32 %r10, %r2, %r3;",
            Box::new(|a, b, _| u(if b >= 32 { 0 } else { a >> b })),
        ),
        (
            "shr.s32 %r10, %r2, %r3;",
            Box::new(|a, b, _| u(((a as i32) >> b.min(31)) as u32)),
        ),
        ("shl.b32 %r10, %r2, 3;", Box::new(|a, _, _| u(a << 3))),
        (
            "add.u32 %r10, %r2, -1;",
            Box::new(|a, _, _| u(a.wrapping_sub(1))),
        ),
    ];
    for (body, f) in cases {
        let body = format!("{body}\ncvt.u64.u32 %rd10, %r10;");
        check(&body, &x, f);
    }
}

#[test]
fn division_by_zero_is_defined() {
    let mut x = ints(2);
    for v in x.iter_mut() {
        v[1] = 0;
    }
    check(
        "div.u32 %r10, %r2, %r3;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        |_, _, _| 0xffff_ffff,
    );
    check(
        "rem.u32 %r10, %r2, %r3;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        |a, _, _| u(a),
    );
}

#[test]
fn wide_and_64_bit_integers() {
    let x = ints(3);
    check("mul.wide.u32 %rd10, %r2, %r3;", &x, |a, b, _| {
        a as u64 * b as u64
    });
    check("mul.wide.s32 %rd10, %r2, %r3;", &x, |a, b, _| {
        (a as i32 as i64 * b as i32 as i64) as u64
    });
    check("mad.wide.u32 %rd10, %r2, %r3, %rd3;", &x, |a, b, c| {
        (a as u64 * b as u64).wrapping_add(c as u64 | (a as u64) << 32)
    });
    check("add.u64 %rd10, %rd2, %rd3;", &x, |a, b, c| {
        (a as u64 | (b as u64) << 32).wrapping_add(c as u64 | (a as u64) << 32)
    });
    check("mul.lo.s64 %rd10, %rd2, %rd3;", &x, |a, b, c| {
        (a as u64 | (b as u64) << 32).wrapping_mul(c as u64 | (a as u64) << 32)
    });
    check("shr.s64 %rd10, %rd2, %r3;", &x, |a, b, _| {
        ((a as u64 | (b as u64) << 32) as i64 >> b.min(63)) as u64
    });
    check("shl.b64 %rd10, %rd2, %r3;", &x, |a, b, _| {
        if b >= 64 {
            0
        } else {
            (a as u64 | (b as u64) << 32) << b
        }
    });
    check("xor.b64 %rd10, %rd2, %rd3;", &x, |a, b, c| {
        (a as u64 | (b as u64) << 32) ^ (c as u64 | (a as u64) << 32)
    });
    check(
        "mov.b64 {%r10, %r11}, %rd2; mov.b64 %rd10, {%r11, %r10};",
        &x,
        |a, b, _| b as u64 | (a as u64) << 32,
    );
}

fn floats(seed: u64) -> [[u32; 3]; 32] {
    let mut r = Rng::new(seed);
    let mut v = [[0u32; 3]; 32];
    for (l, x) in v.iter_mut().enumerate() {
        for k in x.iter_mut() {
            *k = (r.f32() * 8.0).to_bits();
        }
        match l {
            1 => x[0] = f32::NAN.to_bits(),
            2 => x[1] = f32::NAN.to_bits(),
            3 => x[0] = f32::INFINITY.to_bits(),
            4 => x[1] = x[0],
            5 => x[0] = 1e-40f32.to_bits(),
            6 => x[0] = (-0.0f32).to_bits(),
            7 => x[1] = 0.0f32.to_bits(),
            _ => {}
        }
    }
    v
}

fn f(x: u32) -> f32 {
    f32::from_bits(x)
}

fn fb(x: f32) -> u64 {
    x.to_bits() as u64
}

fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// Compares floats bitwise except that any NaN equals any NaN.
fn check_f(body: &str, inputs: &[[u32; 3]; 32], g: impl Fn(f32, f32, f32) -> f32) {
    let got = run(
        &format!("{body}\nmov.b32 %r10, %f10;\ncvt.u64.u32 %rd10, %r10;"),
        inputs,
    );
    for (l, i) in inputs.iter().enumerate() {
        let want = g(f(i[0]), f(i[1]), f(i[2]));
        let got = f32::from_bits(got[l] as u32);
        assert!(
            (want.is_nan() && got.is_nan()) || want.to_bits() == got.to_bits(),
            "lane {l}: {body}: inputs {:?} want {want:e} got {got:e}",
            i.map(f)
        );
    }
}

#[test]
fn float_arithmetic() {
    let x = floats(4);
    check_f("add.f32 %f10, %f2, %f3;", &x, |a, b, _| a + b);
    check_f("sub.rn.f32 %f10, %f2, %f3;", &x, |a, b, _| a - b);
    check_f("mul.rn.f32 %f10, %f2, %f3;", &x, |a, b, _| a * b);
    check_f("fma.rn.f32 %f10, %f2, %f3, %f4;", &x, |a, b, c| {
        a.mul_add(b, c)
    });
    check_f("div.rn.f32 %f10, %f2, %f3;", &x, |a, b, _| a / b);
    check_f("add.ftz.f32 %f10, %f2, %f3;", &x, |a, b, _| {
        ftz(ftz(a) + ftz(b))
    });
    check_f("mul.rn.sat.f32 %f10, %f2, %f3;", &x, |a, b, _| {
        let p = a * b;
        if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) }
    });
    check_f("min.f32 %f10, %f2, %f3;", &x, |a, b, _| {
        if a.is_nan() {
            b
        } else if b.is_nan() {
            a
        } else {
            a.min(b)
        }
    });
    check_f("max.f32 %f10, %f2, %f3;", &x, |a, b, _| {
        if a.is_nan() {
            b
        } else if b.is_nan() {
            a
        } else {
            a.max(b)
        }
    });
    check_f("max.NaN.f32 %f10, %f2, %f3;", &x, |a, b, _| {
        if a.is_nan() || b.is_nan() {
            f32::NAN
        } else {
            a.max(b)
        }
    });
    check_f("abs.f32 %f10, %f2;", &x, |a, _, _| a.abs());
    check_f("neg.f32 %f10, %f2;", &x, |a, _, _| -a);
    check_f("sqrt.rn.f32 %f10, %f2;", &x, |a, _, _| a.sqrt());
    check_f("rcp.rn.f32 %f10, %f2;", &x, |a, _, _| 1.0 / a);
    check_f("mov.f32 %f10, 0f3FC00000;", &x, |_, _, _| 1.5);
    // .approx functions: exact f64 results rounded once.
    check_f("ex2.approx.ftz.f32 %f10, %f2;", &x, |a, _, _| {
        ftz((ftz(a) as f64).exp2() as f32)
    });
    check_f("lg2.approx.f32 %f10, %f2;", &x, |a, _, _| {
        (a as f64).log2() as f32
    });
    check_f("rcp.approx.ftz.f32 %f10, %f2;", &x, |a, _, _| {
        ftz(1.0 / ftz(a))
    });
    check_f(
        "cvt.f64.f32 %fd0, %f2; cvt.f64.f32 %fd1, %f3; mul.rn.f64 %fd2, %fd0, %fd1; div.rn.f64 %fd2, %fd2, %fd1; add.rn.f64 %fd2, %fd2, %fd0; cvt.rn.f32.f64 %f10, %fd2;",
        &x,
        |a, b, _| (((a as f64 * b as f64) / b as f64) + a as f64) as f32,
    );
}

#[test]
fn comparisons_and_selects() {
    let x = floats(5);
    let cmps: [(&str, fn(f32, f32) -> bool); 12] = [
        ("eq", |a, b| a == b),
        ("ne", |a, b| !a.is_nan() && !b.is_nan() && a != b),
        ("lt", |a, b| a < b),
        ("le", |a, b| a <= b),
        ("gt", |a, b| a > b),
        ("ge", |a, b| a >= b),
        ("equ", |a, b| a.is_nan() || b.is_nan() || a == b),
        ("neu", |a, b| a != b),
        ("ltu", |a, b| !(a >= b)),
        ("geu", |a, b| !(a < b)),
        ("num", |a, b| !a.is_nan() && !b.is_nan()),
        ("nan", |a, b| a.is_nan() || b.is_nan()),
    ];
    for (c, g) in cmps {
        let body = format!("setp.{c}.f32 %p1, %f2, %f3;\nselp.u64 %rd10, 7, 9, %p1;");
        check(&body, &x, |a, b, _| if g(f(a), f(b)) { 7 } else { 9 });
    }
    let i = ints(6);
    check(
        "setp.lt.s32 %p1, %r2, %r3;\nselp.u64 %rd10, 1, 0, %p1;",
        &i,
        |a, b, _| ((a as i32) < (b as i32)) as u64,
    );
    check(
        "setp.lo.u32 %p1, %r2, %r3;\nselp.u64 %rd10, 1, 0, %p1;",
        &i,
        |a, b, _| (a < b) as u64,
    );
    check(
        "setp.hs.u32 %p1, %r2, %r3;\nselp.u64 %rd10, 1, 0, %p1;",
        &i,
        |a, b, _| (a >= b) as u64,
    );
    // Combining forms and the second (negated) destination.
    check(
        "setp.gt.u32 %p2, %r4, %r2;\nsetp.lt.and.u32 %p1|%p3, %r2, %r3, !%p2;\nselp.u64 %rd10, 1, 0, %p1; selp.u64 %rd11, 2, 0, %p3; or.b64 %rd10, %rd10, %rd11;",
        &i,
        |a, b, c| {
            let p2 = c > a;
            let p1 = (a < b) && !p2;
            let p3 = !(a < b) && !p2;
            p1 as u64 | (2 * p3 as u64)
        },
    );
    check(
        "setp.ne.u32 %p1, %r2, %r3;\nnot.pred %p1, %p1;\nselp.b32 %r10, %r2, %r3, %p1;\ncvt.u64.u32 %rd10, %r10;",
        &i,
        |a, b, _| u(if a == b { a } else { b }),
    );
    let t = floats(7);
    check(
        "testp.finite.f32 %p1, %f2;\nselp.u64 %rd10, 1, 0, %p1;",
        &t,
        |a, _, _| f(a).is_finite() as u64,
    );
    check(
        "testp.notanumber.f32 %p1, %f2;\nselp.u64 %rd10, 1, 0, %p1;",
        &t,
        |a, _, _| f(a).is_nan() as u64,
    );
    check(
        "testp.subnormal.f32 %p1, %f2;\nselp.u64 %rd10, 1, 0, %p1;",
        &t,
        |a, _, _| f(a).is_subnormal() as u64,
    );
}

#[test]
fn conversions() {
    let x = floats(8);
    let bits16 = |v: u16| v as u64;
    check(
        "cvt.rn.bf16.f32 %h0, %f2;\ncvt.u64.u16 %rd10, %h0;",
        &x,
        |a, _, _| bits16(bf16::from_f32(f(a)).to_bits()),
    );
    check(
        "cvt.rn.f16.f32 %h0, %f2;\ncvt.u64.u16 %rd10, %h0;",
        &x,
        |a, _, _| bits16(f16::from_f32(f(a)).to_bits()),
    );
    // Packing order: the first source goes to the upper half.
    check(
        "cvt.rn.bf16x2.f32 %r10, %f2, %f3;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        |a, b, _| {
            (bf16::from_f32(f(a)).to_bits() as u64) << 16 | bf16::from_f32(f(b)).to_bits() as u64
        },
    );
    check(
        "cvt.rn.f16.f32 %h0, %f2; cvt.f32.f16 %f10, %h0; mov.b32 %r10, %f10;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        |a, _, _| {
            let h = f16::from_f32(f(a)).to_f32();
            if h.is_nan() {
                f32::NAN.to_bits() as u64
            } else {
                fb(h)
            }
        },
    );
    let ints_of = |m: &str, r: fn(f32) -> f32| {
        check(
            &format!("cvt.{m}.s32.f32 %r10, %f2;\ncvt.u64.u32 %rd10, %r10;"),
            &x,
            move |a, _, _| {
                let v = r(f(a));
                u(if v.is_nan() { 0 } else { v as i32 } as u32)
            },
        );
    };
    ints_of("rni", |v| v.round_ties_even());
    ints_of("rzi", |v| v.trunc());
    ints_of("rmi", |v| v.floor());
    ints_of("rpi", |v| v.ceil());
    check(
        "cvt.rzi.sat.u8.f32 %r10, %f2;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        |a, _, _| {
            let v = f(a);
            if v.is_nan() {
                0
            } else {
                v.trunc().clamp(0.0, 255.0) as u64
            }
        },
    );
    let i = ints(9);
    check(
        "cvt.rn.f32.u32 %f10, %r2; mov.b32 %r10, %f10;\ncvt.u64.u32 %rd10, %r10;",
        &i,
        |a, _, _| fb(a as f32),
    );
    check(
        "cvt.rz.f32.u32 %f10, %r2; mov.b32 %r10, %f10;\ncvt.u64.u32 %rd10, %r10;",
        &i,
        |a, _, _| {
            let n = a as f32;
            fb(if n as f64 > a as f64 {
                f32::from_bits(n.to_bits() - 1)
            } else {
                n
            })
        },
    );
    check(
        "cvt.rn.f32.s32 %f10, %r2; mov.b32 %r10, %f10;\ncvt.u64.u32 %rd10, %r10;",
        &i,
        |a, _, _| fb(a as i32 as f32),
    );
    check(
        "cvt.u16.u32 %h0, %r2;\ncvt.u32.u16 %r10, %h0;\ncvt.u64.u32 %rd10, %r10;",
        &i,
        |a, _, _| u(a & 0xffff),
    );
    check("cvt.s64.s32 %rd10, %r2;", &i, |a, _, _| {
        a as i32 as i64 as u64
    });
    check(
        "cvt.u32.u64 %r10, %rd2;\ncvt.u64.u32 %rd10, %r10;",
        &i,
        |a, _, _| u(a),
    );
    check(
        "cvt.sat.s16.s32 %r10, %r2;\ncvt.u64.u32 %rd10, %r10;",
        &i,
        |a, _, _| u((a as i32).clamp(-32768, 32767) as u32),
    );
    check(
        "cvt.s32.s16 %r10, %r2;\ncvt.u64.u32 %rd10, %r10;",
        &i,
        |a, _, _| u(a as u16 as i16 as i32 as u32),
    );
}

#[test]
fn shuffles() {
    let x = ints(10);
    let v = |l: usize| x[l][0] as u64;
    let go = |body: &str, src: &dyn Fn(usize) -> (usize, bool)| {
        let got = run(
            &format!(
                "{body}\ncvt.u64.u32 %rd10, %r10; selp.u64 %rd11, 1, 0, %p1; shl.b64 %rd11, %rd11, 32; or.b64 %rd10, %rd10, %rd11;"
            ),
            &x,
        );
        for l in 0..32 {
            let (j, ok) = src(l);
            assert_eq!(got[l], v(j) | (ok as u64) << 32, "lane {l}: {body}");
        }
    };
    go("shfl.sync.bfly.b32 %r10|%p1, %r2, 5, 31, -1;", &|l| {
        (l ^ 5, true)
    });
    go("shfl.sync.up.b32 %r10|%p1, %r2, 3, 0, -1;", &|l| {
        if l >= 3 { (l - 3, true) } else { (l, false) }
    });
    go("shfl.sync.down.b32 %r10|%p1, %r2, 2, 31, -1;", &|l| {
        if l + 2 <= 31 {
            (l + 2, true)
        } else {
            (l, false)
        }
    });
    go("shfl.sync.idx.b32 %r10|%p1, %r2, 7, 31, -1;", &|_| {
        (7, true)
    });
    // Segments of 8 lanes (c = 0x1807: segmask 0x18, clamp 7).
    go("shfl.sync.idx.b32 %r10|%p1, %r2, 2, 0x1807, -1;", &|l| {
        ((l & !7) | 2, true)
    });
    go("shfl.sync.down.b32 %r10|%p1, %r2, 1, 0x1807, -1;", &|l| {
        if (l & 7) < 7 {
            (l + 1, true)
        } else {
            (l, false)
        }
    });
}

/// Each lane stores (a, b, c, lane) as 16 bytes at `sm + 16 * lane`, then a barrier.
const STORE_ROWS: &str = "shl.b32 %r5, %r1, 4; mov.u32 %r6, sm; add.u32 %r5, %r5, %r6;
st.shared.v4.b32 [%r5], {%r2, %r3, %r4, %r1};
bar.sync 0;";

#[test]
fn shared_vectors_and_generic_addresses() {
    let x = ints(11);
    // Lane l reads words 2..3 of lane (l + 1) % 32's row through a generic address.
    let got = run(
        &format!(
            "{STORE_ROWS}
add.u32 %r7, %r1, 1; and.b32 %r7, %r7, 31; shl.b32 %r7, %r7, 4; add.u32 %r7, %r7, %r6;
cvt.u64.u32 %rd6, %r7; cvta.shared.u64 %rd6, %rd6;
ld.v2.u32 {{%r10, %r11}}, [%rd6+8];
mov.b64 %rd10, {{%r10, %r11}};"
        ),
        &x,
    );
    for l in 0..32 {
        let m = (l + 1) % 32;
        assert_eq!(got[l], x[m][2] as u64 | (m as u64) << 32, "lane {l}");
    }
}

#[test]
fn ldmatrix_x4_plain_and_transposed() {
    let x = ints(12);
    // Row r of the 32 x 8 b16 matrix is lane r's (a, b, c, lane).
    let row = |r: usize| [x[r][0], x[r][1], x[r][2], r as u32];
    let elem = |r: usize, c: usize| (row(r)[c / 2] >> (16 * (c % 2))) & 0xffff;
    for trans in [false, true] {
        let t = if trans { ".trans" } else { "" };
        let got = run(
            &format!(
                "{STORE_ROWS}
ldmatrix.sync.aligned.m8n8.x4{t}.shared.b16 {{%r10, %r11, %r12, %r13}}, [%r5];
xor.b32 %r10, %r10, %r11; xor.b32 %r10, %r10, %r12;
mov.b64 %rd10, {{%r10, %r13}};"
            ),
            &x,
        );
        for l in 0..32 {
            let reg = |j: usize| -> u32 {
                let (r, c) = (l / 4, 2 * (l % 4));
                if trans {
                    elem(8 * j + c, r) | elem(8 * j + c + 1, r) << 16
                } else {
                    elem(8 * j + r, c) | elem(8 * j + r, c + 1) << 16
                }
            };
            let want = (reg(0) ^ reg(1) ^ reg(2)) as u64 | (reg(3) as u64) << 32;
            assert_eq!(got[l], want, "lane {l} trans {trans}");
        }
    }
}

#[test]
fn mma_m16n8k8_f16() {
    let mut r = Rng::new(13);
    let mut x = [[0u32; 3]; 32];
    let h = |v: f32| f16::from_f32(v).to_bits() as u32;
    for v in x.iter_mut() {
        *v = [
            h(r.f32()) | h(r.f32()) << 16,
            h(r.f32()) | h(r.f32()) << 16,
            h(r.f32()) | h(r.f32()) << 16,
        ];
    }
    // A (16x8): a0 = row g, cols 2t..2t+1 (lane's a), a1 = row g+8 (lane's b); B (8x8):
    // b0 = rows 2t..2t+1 of column g (lane's c). C = 0.5 everywhere.
    let got = run(
        "mov.f32 %f20, 0f3F000000;
mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%f10, %f11, %f12, %f13}, {%r2, %r3}, {%r4}, {%f20, %f20, %f20, %f20};
mov.b64 %rd10, {%f10, %f13};",
        &x,
    );
    let hv = |w: u32, hi: bool| f16::from_bits((if hi { w >> 16 } else { w }) as u16).to_f64();
    let mut a = [[0f64; 8]; 16];
    let mut b = [[0f64; 8]; 8];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for hi in [false, true] {
            let c = 2 * t + hi as usize;
            a[g][c] = hv(x[l][0], hi);
            a[g + 8][c] = hv(x[l][1], hi);
            b[c][g] = hv(x[l][2], hi);
        }
    }
    let d = |i: usize, j: usize| ((0..8).map(|k| a[i][k] * b[k][j]).sum::<f64>() + 0.5) as f32;
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        let want = fb(d(g, 2 * t)) | fb(d(g + 8, 2 * t + 1)) << 32;
        assert_eq!(got[l], want, "lane {l}");
    }
}

#[test]
fn byte_and_bit_field_operations() {
    let x = ints(14);
    check(
        "prmt.b32 %r10, %r2, %r3, %r4;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        |a, b, c| {
            let v = a as u64 | (b as u64) << 32;
            let mut o = 0u32;
            for i in 0..4 {
                let n = (c >> (4 * i)) & 0xf;
                let byte = ((v >> (8 * (n & 7))) & 0xff) as u32;
                let byte = if n & 8 != 0 {
                    if byte & 0x80 != 0 { 0xff } else { 0 }
                } else {
                    byte
                };
                o |= byte << (8 * i);
            }
            u(o)
        },
    );
    // Field positions and lengths from b and c (low bytes), including past the msb.
    let field = |a: u32, pos: u32, len: u32, signed: bool| -> u32 {
        if len == 0 {
            return 0;
        }
        let sbit = signed && (a >> (pos + len - 1).min(31)) & 1 != 0;
        (0..32).fold(0, |o, i| {
            let bit = if i < len && pos + i < 32 {
                (a >> (pos + i)) & 1 != 0
            } else {
                sbit
            };
            o | (bit as u32) << i
        })
    };
    check(
        "bfe.u32 %r10, %r2, %r3, %r4;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        move |a, b, c| u(field(a, b & 0xff, c & 0xff, false)),
    );
    check(
        "and.b32 %r5, %r3, 31; and.b32 %r6, %r4, 15;\nbfe.s32 %r10, %r2, %r5, %r6;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        move |a, b, c| u(field(a, b & 31, c & 15, true)),
    );
    check(
        "and.b32 %r5, %r4, 31;\nbfi.b32 %r10, %r2, %r3, %r5, 9;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        |a, b, c| {
            let pos = c & 31;
            let mut o = b;
            for i in 0..9 {
                if pos + i < 32 {
                    o = (o & !(1 << (pos + i))) | (((a >> i) & 1) << (pos + i));
                }
            }
            u(o)
        },
    );
}

#[test]
fn votes() {
    let x = ints(15);
    let p: Vec<bool> = x.iter().map(|v| v[0] & 4 != 0).collect();
    let ballot = p
        .iter()
        .enumerate()
        .fold(0u32, |m, (l, b)| m | (*b as u32) << l);
    let setp = "and.b32 %r5, %r2, 4; setp.ne.u32 %p1, %r5, 0;\n";
    check(
        &format!("{setp}vote.sync.ballot.b32 %r10, %p1, -1;\ncvt.u64.u32 %rd10, %r10;"),
        &x,
        |_, _, _| u(ballot),
    );
    check(
        &format!("{setp}vote.sync.ballot.b32 %r10, !%p1, -1;\ncvt.u64.u32 %rd10, %r10;"),
        &x,
        |_, _, _| u(!ballot),
    );
    check(
        &format!("{setp}vote.sync.any.pred %p2, %p1, -1;\nselp.u64 %rd10, 1, 0, %p2;"),
        &x,
        |_, _, _| (ballot != 0) as u64,
    );
    check(
        &format!("{setp}vote.sync.all.pred %p2, %p1, -1;\nselp.u64 %rd10, 1, 0, %p2;"),
        &x,
        |_, _, _| (ballot == u32::MAX) as u64,
    );
    check(
        "setp.ne.u32 %p1, %r1, 99;\nvote.sync.uni.pred %p2, %p1, -1;\nselp.u64 %rd10, 1, 0, %p2;",
        &x,
        |_, _, _| 1,
    );
}

#[test]
fn elect_and_activemask() {
    let x = ints(16);
    let got = run(
        "elect.sync %r10|%p1, -1;\nselp.u32 %r11, 1, 0, %p1;\nmov.b64 %rd10, {%r10, %r11};",
        &x,
    );
    for l in 0..32 {
        assert_eq!(got[l], ((l == 0) as u64) << 32, "lane {l}");
    }
    // Only odd lanes take part: lane 1 is elected, the active mask is 0xaaaaaaaa.
    let got = run(
        "mov.u64 %rd10, 0;\nand.b32 %r5, %r1, 1; setp.eq.u32 %p2, %r5, 1;\n@!%p2 bra SKIP;\nelect.sync %r10|%p1, 0xaaaaaaaa;\nactivemask.b32 %r11;\nselp.u32 %r12, 1, 0, %p1; add.u32 %r11, %r11, %r12;\nmov.b64 %rd10, {%r10, %r11};\nSKIP:",
        &x,
    );
    for l in 0..32 {
        let want = if l % 2 == 1 {
            1 | ((0xaaaa_aaaau64 + (l == 1) as u64) << 32)
        } else {
            0
        };
        assert_eq!(got[l], want, "lane {l}");
    }
}

/// The device handles cross threads.
#[test]
fn sim_and_module_are_send_and_sync() {
    fn check<T: Send + Sync + Clone>() {}
    check::<lathe_sim::Sim>();
    check::<lathe_sim::Module>();
}

#[test]
fn half_precision_arithmetic() {
    let mut r = Rng::new(17);
    let mut x = [[0u32; 3]; 32];
    for v in x.iter_mut() {
        for k in v.iter_mut() {
            let h = |r: &mut Rng| f16::from_f32(r.f32() * 4.0).to_bits() as u32;
            *k = h(&mut r) | h(&mut r) << 16;
        }
    }
    let h = |w: u32, hi: bool| f16::from_bits((if hi { w >> 16 } else { w }) as u16).to_f64();
    let to = |v: f64| f16::from_f64(v).to_bits() as u64;
    check(
        "add.f16x2 %r10, %r2, %r3;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        |a, b, _| to(h(a, false) + h(b, false)) | to(h(a, true) + h(b, true)) << 16,
    );
    check(
        "fma.rn.f16x2 %r10, %r2, %r3, %r4;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        |a, b, c| {
            to(h(a, false) * h(b, false) + h(c, false))
                | to(h(a, true) * h(b, true) + h(c, true)) << 16
        },
    );
    check(
        "mov.b32 {%h0, %h1}, %r2; mov.b32 {%h2, %h3}, %r3; mul.rn.f16 %h4, %h0, %h2;\ncvt.u64.u16 %rd10, %h4;",
        &x,
        |a, b, _| to(h(a, false) * h(b, false)),
    );
    check(
        "max.f16x2 %r10, %r2, %r3;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        |a, b, _| to(h(a, false).max(h(b, false))) | to(h(a, true).max(h(b, true))) << 16,
    );
    check(
        "neg.f16x2 %r10, %r2;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        |a, _, _| u(a ^ 0x8000_8000),
    );
    // bf16: the same pairs read as bf16.
    let g = |w: u32, hi: bool| bf16::from_bits((if hi { w >> 16 } else { w }) as u16).to_f64();
    let tb = |v: f64| bf16::from_f64(v).to_bits() as u64;
    check(
        "sub.rn.bf16x2 %r10, %r2, %r3;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        |a, b, _| tb(g(a, false) - g(b, false)) | tb(g(a, true) - g(b, true)) << 16,
    );
    check(
        "fma.rn.bf16x2 %r10, %r2, %r3, %r4;\ncvt.u64.u32 %rd10, %r10;",
        &x,
        |a, b, c| {
            tb(g(a, false) * g(b, false) + g(c, false))
                | tb(g(a, true) * g(b, true) + g(c, true)) << 16
        },
    );
}
