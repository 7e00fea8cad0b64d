//! `lathe_sim::tensor_map`: encode/decode round trips, every check `cuTensorMapEncodeTiled`
//! makes (each an `ErrorKind::TensorMap` naming the field and value), and rejection of blobs
//! that are not Lathe tensor maps.

use lathe_sim::ErrorKind;
use lathe_sim::tensor_map::{Swizzle, TensorMapDesc, TmaDtype, decode, encode, validate};

const DTYPES: [TmaDtype; 6] = [
    TmaDtype::U8,
    TmaDtype::U16,
    TmaDtype::U32,
    TmaDtype::F16,
    TmaDtype::BF16,
    TmaDtype::F32,
];
const SWIZZLES: [Swizzle; 4] = [Swizzle::None, Swizzle::B32, Swizzle::B64, Swizzle::B128];

fn base() -> TensorMapDesc {
    TensorMapDesc {
        dtype: TmaDtype::BF16,
        global_addr: 0x7f12_3456_7800,
        dims: vec![768, 16384],
        strides: vec![1536],
        box_dims: vec![64, 128],
        swizzle: Swizzle::B128,
    }
}

#[test]
fn round_trips_every_rank_dtype_and_swizzle() {
    let mut count = 0;
    for rank in 1..=5usize {
        for dtype in DTYPES {
            for swizzle in SWIZZLES {
                let e = dtype.size();
                let inner_box = swizzle.span_bytes().min(64) / e;
                let desc = TensorMapDesc {
                    dtype,
                    global_addr: 0x1000 * rank as u64 + 0x10,
                    dims: (0..rank as u64)
                        .map(|i| if i == 4 { 1 << 32 } else { 1 + 37 * i })
                        .collect(),
                    strides: (1..rank as u64).map(|i| 16 << (3 * i)).collect(),
                    box_dims: (0..rank as u32)
                        .map(|i| if i == 0 { inner_box } else { 1 + 51 * i })
                        .collect(),
                    swizzle,
                };
                let blob = encode(&desc).unwrap();
                assert_eq!(decode(&blob).unwrap(), desc);
                count += 1;
            }
        }
    }
    assert_eq!(count, 5 * 6 * 4);
}

#[test]
fn extremes_are_accepted() {
    let mut d = base();
    d.dims = vec![1 << 32, 1];
    d.strides = vec![(1 << 40) - 16];
    d.box_dims = vec![64, 256];
    assert_eq!(decode(&encode(&d).unwrap()).unwrap(), d);
    d.global_addr = 0;
    d.swizzle = Swizzle::None;
    d.box_dims = vec![256, 1];
    assert_eq!(decode(&encode(&d).unwrap()).unwrap(), d);
}

/// Applies `edit` to the base map and expects a TensorMap error whose message names `field`
/// and `value`, from both `validate` and `encode`.
fn rejects(edit: impl Fn(&mut TensorMapDesc), field: &str, value: &str) {
    let mut d = base();
    edit(&mut d);
    for e in [validate(&d).unwrap_err(), encode(&d).unwrap_err()] {
        assert_eq!(e.kind, ErrorKind::TensorMap, "{e}");
        assert!(
            e.message.contains(field) && e.message.contains(value),
            "message `{}` should name {field} and {value}",
            e.message
        );
    }
}

#[test]
fn every_driver_check_is_an_error_naming_the_field() {
    rejects(
        |d| {
            d.dims = vec![];
            d.strides = vec![];
            d.box_dims = vec![];
        },
        "rank",
        "0",
    );
    rejects(
        |d| {
            d.dims = vec![2; 6];
            d.strides = vec![16; 5];
            d.box_dims = vec![1; 6];
        },
        "rank",
        "6",
    );
    rejects(|d| d.strides = vec![], "strides.len()", "0");
    rejects(|d| d.box_dims = vec![64], "box_dims.len()", "1");
    rejects(|d| d.global_addr = 0x1008, "global_addr", "0x1008");
    rejects(|d| d.dims[1] = 0, "dims[1]", "0");
    rejects(|d| d.dims[0] = (1 << 32) + 1, "dims[0]", "4294967297");
    rejects(|d| d.strides[0] = 1544, "strides[0]", "1544");
    rejects(|d| d.strides[0] = 1 << 40, "strides[0]", "1099511627776");
    rejects(|d| d.box_dims[1] = 0, "box_dims[1]", "0");
    rejects(|d| d.box_dims[1] = 257, "box_dims[1]", "257");
    rejects(|d| d.box_dims[0] = 60, "box_dims[0]", "60");
    // Inner box extent over the swizzle span, for each swizzle.
    for (swizzle, elems) in [(Swizzle::B32, 24), (Swizzle::B64, 40), (Swizzle::B128, 72)] {
        rejects(
            |d| {
                d.swizzle = swizzle;
                d.box_dims[0] = elems;
            },
            "box_dims[0]",
            &format!("{}", elems * 2),
        );
    }
    // The same extents are fine without swizzle.
    let mut d = base();
    d.swizzle = Swizzle::None;
    d.box_dims[0] = 72;
    validate(&d).unwrap();
}

#[test]
fn decode_rejects_what_encode_did_not_write() {
    let blob = encode(&base()).unwrap();
    let kind = |b: &[u8]| decode(b).unwrap_err().kind;
    assert_eq!(kind(&blob[..127]), ErrorKind::TensorMap);
    assert_eq!(kind(&[0u8; 128]), ErrorKind::TensorMap);
    // Any single flipped bit anywhere is caught (magic, version, fields or checksum).
    for byte in 0..128 {
        for bit in 0..8 {
            let mut b = blob;
            b[byte] ^= 1 << bit;
            assert_eq!(kind(&b), ErrorKind::TensorMap, "bit {bit} of byte {byte}");
        }
    }
    // Random bytes are rejected.
    let mut s = 0x1234_5678_9abc_def1u64;
    for _ in 0..2000 {
        let mut b = [0u8; 128];
        for v in b.iter_mut() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *v = s as u8;
        }
        b[0..4].copy_from_slice(b"LTMA");
        b[4] = 1;
        assert_eq!(kind(&b), ErrorKind::TensorMap);
    }
}

/// Re-seals a tampered blob with a valid checksum (FNV-1a 64 of bytes 0..120), so the field
/// checks behind the checksum are exercised too.
fn reseal(b: &mut [u8; 128]) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in &b[..120] {
        h ^= x as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    b[120..].copy_from_slice(&h.to_le_bytes());
}

#[test]
fn decode_checks_fields_behind_a_valid_checksum() {
    let blob = encode(&base()).unwrap();
    let mut ok = blob;
    reseal(&mut ok);
    assert_eq!(
        decode(&ok).unwrap(),
        base(),
        "reseal matches encode's checksum"
    );
    let cases: [(usize, u8, &str); 6] = [
        (5, 0, "rank"),
        (5, 6, "rank"),
        (6, 3, "dtype"),
        (7, 4, "swizzle"),
        (100, 1, "reserved"),
        (4, 2, "version"),
    ];
    for (at, v, field) in cases {
        let mut b = blob;
        b[at] = v;
        reseal(&mut b);
        let e = decode(&b).unwrap_err();
        assert_eq!(e.kind, ErrorKind::TensorMap);
        assert!(e.message.contains(field), "{}", e.message);
    }
    // A third dim in a rank-2 map: an unused slot that is not zero.
    let mut b = blob;
    b[16 + 16] = 1;
    reseal(&mut b);
    assert!(decode(&b).unwrap_err().message.contains("rank 2"));
    // A field that passes the checksum but fails the driver checks: box dim 300.
    let mut b = blob;
    b[88..90].copy_from_slice(&300u16.to_le_bytes());
    reseal(&mut b);
    assert!(
        decode(&b)
            .unwrap_err()
            .message
            .contains("box_dims[0] = 300")
    );
}

#[test]
fn box_bytes_and_codes() {
    assert_eq!(base().box_bytes(), 64 * 128 * 2);
    for t in DTYPES {
        assert_eq!(TmaDtype::from_code(t.code()), Some(t));
    }
    for s in SWIZZLES {
        assert_eq!(Swizzle::from_code(s.code()), Some(s));
    }
    assert_eq!(TmaDtype::BF16.code(), 9, "CU_TENSOR_MAP_DATA_TYPE_BFLOAT16");
    assert_eq!(Swizzle::B128.code(), 3, "CU_TENSOR_MAP_SWIZZLE_128B");
}
