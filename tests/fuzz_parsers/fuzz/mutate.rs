//! Valid request bodies and the mutations applied to them.
//!
//! A case is a valid body (built from [`InputLimits`] and a seed by a small
//! deterministic RNG, so building a 96-wide batch costs no proptest
//! machinery) plus a short list of mutations drawn by proptest (so a failure
//! shrinks to the fewest, simplest mutations). Mutations work either on the
//! bytes ([`ByteOp`]) or on the [`Node`] tree before it is written
//! ([`TreeOp`], and the format-aware [`SidecarOp`] and [`V2Op`]).

use proptest::prelude::*;
use tokitai_serve::input::InputLimits;

use super::json::{Node, quote};

// ---- a tiny deterministic RNG ---------------------------------------------------

/// splitmix64: the body builders' randomness, from one proptest `u64`.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

// ---- numbers and strings ----------------------------------------------------------

/// Spellings of numbers that are finite as f32 (some only after rounding).
const FINITE_SPELLINGS: &[&str] = &[
    "0",
    "-0",
    "0.0",
    "-0.0",
    "0e0",
    "-0E-0",
    "1",
    "-1",
    "1e0",
    "1E+2",
    "1e-2",
    "-1.5e-3",
    "2.5E3",
    "1e-45",
    "-1e-45",
    "1.4e-45",
    "7e-46",
    "1e-46",
    "1e-400",
    "-1e-400",
    "1.17549435e-38",
    "3.4028235e38",
    "-3.4028235e38",
    "340282346638528859811704183484516925440",
    "3.40282356e38",
    "16777217",
    "9007199254740993",
    "9223372036854775807",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "123456789012345678901234567890",
    "0.000000000000000000000000000000000000000000000000001",
    "0.1",
    "0.30000000000000004",
    "123456.789e-3",
    "1.00000000000000000000000000000000000000000001",
];

/// Numbers (and near-numbers) a valid body must not carry, or that are not
/// JSON at all.
pub const HOSTILE_NUMBERS: &[&str] = &[
    "1e39",
    "-1e39",
    "1e308",
    "-1e308",
    "1.7976931348623157e308",
    "3.4028236e38",
    "-3.4028236e38",
    "340282356779733661637539395458142568448",
    "1e309",
    "-1e309",
    "1e99999999999999999999",
    "184467440737095516150000000000000000000000",
    "-0",
    "1e-45",
    "18446744073709551616",
    "-9223372036854775809",
    "NaN",
    "-NaN",
    "Infinity",
    "-Infinity",
    "inf",
    "00",
    "01",
    "1.",
    ".5",
    "+1",
    "-",
    "1e",
    "1e+",
    "0x10",
    "1_000",
    "1,5",
];

/// A number finite as f32, in one of many spellings.
pub fn finite_number(rng: &mut Rng) -> Node {
    let text = match rng.below(10) {
        0..=3 => {
            let mut v = f32::from_bits(rng.next() as u32);
            if !v.is_finite() {
                v = 0.25;
            }
            match rng.below(3) {
                0 => format!("{v}"),
                1 => format!("{v:e}"),
                _ => format!("{v:?}"),
            }
        }
        4 => format!("{}", rng.below(2001) as i64 - 1000),
        5 => format!("{}", (rng.next() as f64 / u64::MAX as f64 - 0.5) * 2e6),
        6 => rng.pick(FINITE_SPELLINGS).to_string(),
        7 => match rng.below(3) {
            0 => format!("{}", rng.next()),
            1 => format!("{}", rng.next() as i64),
            _ => format!("{}.{:03}e{}", rng.below(10), rng.below(1000), rng.below(60) as i64 - 30),
        },
        _ => format!("{}.{}", rng.below(100) as i64 - 50, rng.below(1000)),
    };
    Node::Num(text)
}

fn numbers(rng: &mut Rng, n: usize) -> Vec<Node> {
    (0..n).map(|_| finite_number(rng)).collect()
}

/// A short string with escapes, quotes, control characters and non-ASCII.
pub fn short_string(rng: &mut Rng) -> String {
    const PARTS: &[&str] = &[
        "a", "id-7", "features", "logits", "FP32", "\"", "\\", "/", "\n", "\t", "\u{0}", "\u{1f}", "é", "日本", "😀",
        "\u{7f}", "\u{fffd}", "\u{2028}", " ",
    ];
    (0..rng.below(5)).map(|_| *rng.pick(PARTS)).collect()
}

/// A string of about `len` bytes (up to 100 KB).
pub fn long_string(rng: &mut Rng, len: usize) -> String {
    let unit = *rng.pick(&["a", "\\", "é", "\"", "😀", "x\u{0}"]);
    unit.repeat(len / unit.len())
}

/// A small JSON value of any type, for unknown fields and retyping.
pub fn any_value(rng: &mut Rng, depth: usize) -> Node {
    match rng.below(if depth == 0 { 4 } else { 6 }) {
        0 => Node::Null,
        1 => Node::Bool(rng.chance(2)),
        2 => finite_number(rng),
        3 => Node::Str(short_string(rng)),
        4 => Node::Arr((0..rng.below(4)).map(|_| any_value(rng, depth - 1)).collect()),
        _ => Node::Obj(
            (0..rng.below(3))
                .map(|_| (quote(&short_string(rng)), any_value(rng, depth - 1)))
                .collect(),
        ),
    }
}

/// A key the parsers do not read, or a near miss of one they do.
fn unknown_key(rng: &mut Rng) -> String {
    const KEYS: &[&str] = &[
        "\"x\"",
        "\"\"",
        "\"Features\"",
        "\"features \"",
        "\"rows\"",
        "\"model\"",
        "\"timeout\"",
        "\"input\"",
        "\"output\"",
        "\"parameter\"",
        "\"\\u0000\"",
        "\"binary_data\"",
        "\"\\ud83d\\ude00\"",
    ];
    rng.pick(KEYS).to_string()
}

/// Spellings of the known keys, for renames: exact, escaped, case-changed.
const KEY_SPELLINGS: &[&str] = &[
    "\"features\"",
    "\"feat\\u0075res\"",
    "\"FEATURES\"",
    "\"id\"",
    "\"\\u0069d\"",
    "\"inputs\"",
    "\"outputs\"",
    "\"parameters\"",
    "\"name\"",
    "\"shape\"",
    "\"datatype\"",
    "\"data\"",
    "\"binary_data_size\"",
    "\"binary_data_output\"",
    "\"binary_data\"",
    "\"x\"",
];

// ---- valid bodies ------------------------------------------------------------

/// The limits a case runs under: mostly small rows, sometimes the real 96.
pub fn limits() -> impl Strategy<Value = InputLimits> {
    prop_oneof![
        6 => Just(InputLimits { row_len: 4, max_rows: 8 }),
        2 => Just(InputLimits { row_len: 96, max_rows: 8 }),
        1 => Just(InputLimits { row_len: 4, max_rows: 1 }),
        1 => Just(InputLimits { row_len: 3, max_rows: 2 }),
        1 => Just(InputLimits { row_len: 1, max_rows: 3 }),
    ]
}

/// Rows for a valid body: mostly 1-3, sometimes up to the limit.
fn row_count(rng: &mut Rng, limits: &InputLimits) -> usize {
    let cap = if limits.row_len > 16 && !rng.chance(4) {
        2
    } else {
        limits.max_rows
    };
    if rng.chance(5) {
        cap.min(limits.max_rows)
    } else {
        1 + rng.below(cap.min(3))
    }
}

/// Shuffles entries (the parsers must not care about key order).
fn shuffle<T>(rng: &mut Rng, xs: &mut [T]) {
    for i in (1..xs.len()).rev() {
        xs.swap(i, rng.below(i + 1));
    }
}

/// Unknown fields added to an object's entries.
fn add_unknown(rng: &mut Rng, entries: &mut Vec<(String, Node)>) {
    if rng.chance(3) {
        for _ in 0..1 + rng.below(2) {
            entries.push((unknown_key(rng), any_value(rng, 2)));
        }
    }
}

/// A valid `/infer` body: the flat one-row form or the batch form.
pub fn sidecar_body(limits: &InputLimits, seed: u64) -> Node {
    let mut rng = Rng::new(seed);
    let features = if rng.chance(3) {
        Node::Arr(numbers(&mut rng, limits.row_len))
    } else {
        let n = row_count(&mut rng, limits);
        Node::Arr((0..n).map(|_| Node::Arr(numbers(&mut rng, limits.row_len))).collect())
    };
    let mut entries = vec![(quote("features"), features)];
    add_unknown(&mut rng, &mut entries);
    shuffle(&mut rng, &mut entries);
    Node::Obj(entries)
}

/// A valid v2 infer request: the header and the binary part.
pub fn v2_body(limits: &InputLimits, seed: u64) -> (Node, Vec<u8>) {
    let mut rng = Rng::new(seed);
    let n = row_count(&mut rng, limits);
    let count = n * limits.row_len;
    let mut binary = Vec::new();
    let mut tensor = vec![
        (quote("name"), Node::str("features")),
        (quote("datatype"), Node::str("FP32")),
        (quote("shape"), Node::Arr(vec![Node::num(n), Node::num(limits.row_len)])),
    ];
    if rng.chance(3) {
        for _ in 0..count {
            let mut v = f32::from_bits(rng.next() as u32);
            if !v.is_finite() {
                v = -0.0;
            }
            binary.extend_from_slice(&v.to_le_bytes());
        }
        let mut params = vec![(quote("binary_data_size"), Node::num(binary.len()))];
        add_unknown(&mut rng, &mut params);
        tensor.push((quote("parameters"), Node::Obj(params)));
    } else {
        let data = match rng.below(3) {
            0 => Node::Arr(numbers(&mut rng, count)),
            1 => Node::Arr((0..n).map(|_| Node::Arr(numbers(&mut rng, limits.row_len))).collect()),
            // Nested deeper, one value per innermost array.
            _ => Node::Arr(
                (0..n)
                    .map(|_| {
                        Node::Arr(
                            (0..limits.row_len)
                                .map(|_| Node::Arr(vec![finite_number(&mut rng)]))
                                .collect(),
                        )
                    })
                    .collect(),
            ),
        };
        tensor.push((quote("data"), data));
        if rng.chance(4) {
            tensor.push((quote("parameters"), Node::obj(vec![])));
        }
    }
    add_unknown(&mut rng, &mut tensor);
    shuffle(&mut rng, &mut tensor);

    let mut top = vec![(quote("inputs"), Node::Arr(vec![Node::Obj(tensor)]))];
    if rng.chance(2) {
        top.push((quote("id"), Node::Str(short_string(&mut rng))));
    }
    if rng.chance(2) {
        let mut names = vec!["logits", "router_weights"];
        shuffle(&mut rng, &mut names);
        names.truncate(1 + rng.below(2));
        let outputs = names
            .into_iter()
            .map(|name| {
                let mut o = vec![(quote("name"), Node::str(name))];
                if rng.chance(2) {
                    o.push((
                        quote("parameters"),
                        Node::obj(vec![("binary_data", Node::Bool(rng.chance(2)))]),
                    ));
                }
                Node::Obj(o)
            })
            .collect();
        top.push((quote("outputs"), Node::Arr(outputs)));
    }
    if rng.chance(3) {
        top.push((
            quote("parameters"),
            Node::obj(vec![("binary_data_output", Node::Bool(rng.chance(2)))]),
        ));
    }
    add_unknown(&mut rng, &mut top);
    shuffle(&mut rng, &mut top);
    (Node::Obj(top), binary)
}

// ---- byte mutations --------------------------------------------------------------

/// Fragments spliced into bodies: JSON punctuation, keywords, hostile
/// numbers, escapes, and byte sequences that are not UTF-8.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b":",
    b"-",
    b".",
    b"e",
    b"E+",
    b"0",
    b" ",
    b"\t\r\n",
    b"null",
    b"true",
    b"fals",
    b"1e39",
    b"-1e39",
    b"1e308",
    b"1e400",
    b"NaN",
    b"Infinity",
    b"18446744073709551616",
    b"9223372036854775807",
    b"-0",
    b"\"features\"",
    b"\"features\":",
    b"\"data\":",
    b"\"shape\":",
    b"\"inputs\":",
    b"\"outputs\":",
    b"\"id\":",
    b"\"binary_data_size\":",
    b"[[[[[[[[",
    b"]]]]",
    b"{\"\":{\"\":",
    b"\\u0000",
    b"\\ud800",
    b"\\udc00\\ud800",
    b"\\u12",
    b"\\x",
    b"\x00",
    b"\x1f",
    b"\x7f",
    b"\xff",
    b"\xfe\xff",
    b"\xc0\x80",
    b"\xc3\x28",
    b"\xe2\x82",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xef\xbb\xbf",
];

pub fn token(i: usize) -> &'static [u8] {
    TOKENS[i % TOKENS.len()]
}

pub const TOKEN_COUNT: usize = TOKENS.len();

/// One byte-level mutation; positions are taken modulo the body's length.
#[derive(Clone, Debug)]
pub enum ByteOp {
    Truncate {
        at: u64,
    },
    Flip {
        at: u64,
        bit: u8,
    },
    Set {
        at: u64,
        byte: u8,
    },
    Insert {
        at: u64,
        bytes: Vec<u8>,
    },
    Token {
        at: u64,
        token: usize,
        replace: u8,
    },
    Delete {
        at: u64,
        len: u8,
    },
    Duplicate {
        from: u64,
        len: u16,
        to: u64,
    },
    /// `depth` brackets (balanced or not) spliced in.
    Deep {
        at: u64,
        depth: u16,
        balanced: bool,
        object: bool,
    },
    /// A run of random bytes replacing part of the body.
    Random {
        at: u64,
        seed: u64,
        len: u8,
    },
}

pub fn byte_op() -> impl Strategy<Value = ByteOp> {
    prop_oneof![
        3 => any::<u64>().prop_map(|at| ByteOp::Truncate { at }),
        3 => (any::<u64>(), 0u8..8).prop_map(|(at, bit)| ByteOp::Flip { at, bit }),
        2 => (any::<u64>(), any::<u8>()).prop_map(|(at, byte)| ByteOp::Set { at, byte }),
        2 => (any::<u64>(), prop::collection::vec(any::<u8>(), 1..4)).prop_map(|(at, bytes)| ByteOp::Insert { at, bytes }),
        4 => (any::<u64>(), any::<usize>(), 0u8..3).prop_map(|(at, token, replace)| ByteOp::Token { at, token, replace }),
        3 => (any::<u64>(), 1u8..16).prop_map(|(at, len)| ByteOp::Delete { at, len }),
        2 => (any::<u64>(), 1u16..200, any::<u64>()).prop_map(|(from, len, to)| ByteOp::Duplicate { from, len, to }),
        1 => (any::<u64>(), prop_oneof![1u16..8, 126u16..132, 200u16..400], any::<bool>(), any::<bool>())
            .prop_map(|(at, depth, balanced, object)| ByteOp::Deep { at, depth, balanced, object }),
        1 => (any::<u64>(), any::<u64>(), 1u8..32).prop_map(|(at, seed, len)| ByteOp::Random { at, seed, len }),
    ]
}

fn pos(at: u64, len: usize) -> usize {
    (at % (len as u64 + 1)) as usize
}

pub fn apply_bytes(body: &mut Vec<u8>, op: &ByteOp) {
    let len = body.len();
    match op {
        ByteOp::Truncate { at } => body.truncate(pos(*at, len)),
        ByteOp::Flip { at, bit } => {
            if len > 0 {
                body[pos(*at, len - 1)] ^= 1 << bit;
            }
        }
        ByteOp::Set { at, byte } => {
            if len > 0 {
                body[pos(*at, len - 1)] = *byte;
            }
        }
        ByteOp::Insert { at, bytes } => {
            let p = pos(*at, len);
            body.splice(p..p, bytes.iter().copied());
        }
        ByteOp::Token { at, token: t, replace } => {
            let p = pos(*at, len);
            let end = (p + *replace as usize).min(len);
            body.splice(p..end, token(*t).iter().copied());
        }
        ByteOp::Delete { at, len: n } => {
            let p = pos(*at, len);
            let end = (p + *n as usize).min(len);
            body.drain(p..end);
        }
        ByteOp::Duplicate { from, len: n, to } => {
            let p = pos(*from, len);
            let end = (p + *n as usize).min(len);
            let span: Vec<u8> = body[p..end].to_vec();
            let q = pos(*to, len);
            body.splice(q..q, span);
        }
        ByteOp::Deep {
            at,
            depth,
            balanced,
            object,
        } => {
            let p = pos(*at, len);
            let d = *depth as usize;
            let (open, close): (&[u8], &[u8]) = if *object { (b"{\"a\":", b"}") } else { (b"[", b"]") };
            let mut s = open.repeat(d);
            if *balanced {
                s.extend_from_slice(b"1");
                s.extend(close.repeat(d));
            }
            body.splice(p..p, s);
        }
        ByteOp::Random { at, seed, len: n } => {
            let mut rng = Rng::new(*seed);
            let p = pos(*at, len);
            let end = (p + *n as usize / 2).min(len);
            let bytes: Vec<u8> = (0..*n).map(|_| rng.next() as u8).collect();
            body.splice(p..end, bytes);
        }
    }
}

// ---- tree mutations ----------------------------------------------------------------

/// One structure-level mutation of a [`Node`] tree. `at` picks a node in
/// preorder (modulo the node count; the root is node 0).
#[derive(Clone, Debug)]
pub enum TreeOp {
    /// Replace the node with one of another type.
    Retype { at: u64, seed: u64 },
    /// Replace the node with a hostile number.
    Hostile { at: u64, which: usize },
    /// Remove the node from its array or object.
    Remove { at: u64 },
    /// Repeat the node in its parent (an object entry: a true duplicate key).
    Repeat { at: u64, times: u8 },
    /// Add an unknown field to an object, or a value to an array.
    Extra { at: u64, seed: u64 },
    /// Empty an array or object.
    Empty { at: u64 },
    /// Wrap the node in `depth` arrays (or objects).
    Nest { at: u64, depth: u16, object: bool },
    /// Replace the node with a long string (up to 100 KB).
    Long { at: u64, len: u32, seed: u64 },
    /// Rename the node's key (when its parent is an object).
    Rekey { at: u64, which: usize },
}

pub fn tree_op() -> impl Strategy<Value = TreeOp> {
    prop_oneof![
        4 => (any::<u64>(), any::<u64>()).prop_map(|(at, seed)| TreeOp::Retype { at, seed }),
        3 => (any::<u64>(), any::<usize>()).prop_map(|(at, which)| TreeOp::Hostile { at, which }),
        3 => any::<u64>().prop_map(|at| TreeOp::Remove { at }),
        3 => (any::<u64>(), prop_oneof![1u8..3, 7u8..10]).prop_map(|(at, times)| TreeOp::Repeat { at, times }),
        2 => (any::<u64>(), any::<u64>()).prop_map(|(at, seed)| TreeOp::Extra { at, seed }),
        1 => any::<u64>().prop_map(|at| TreeOp::Empty { at }),
        1 => (any::<u64>(), prop_oneof![4 => 1u16..4, 1 => 125u16..131, 1 => 200u16..300], any::<bool>())
            .prop_map(|(at, depth, object)| TreeOp::Nest { at, depth, object }),
        1 => (any::<u64>(), prop_oneof![9 => 1u32..1000, 1 => 100_000u32..100_001], any::<u64>())
            .prop_map(|(at, len, seed)| TreeOp::Long { at, len, seed }),
        2 => (any::<u64>(), any::<usize>()).prop_map(|(at, which)| TreeOp::Rekey { at, which }),
    ]
}

/// Paths (child indices from the root) of every node, in preorder.
fn paths(root: &Node) -> Vec<Vec<usize>> {
    fn walk(node: &Node, path: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        out.push(path.clone());
        let n = match node {
            Node::Arr(items) => items.len(),
            Node::Obj(entries) => entries.len(),
            _ => 0,
        };
        for i in 0..n {
            let child = match node {
                Node::Arr(items) => &items[i],
                Node::Obj(entries) => &entries[i].1,
                _ => unreachable!(),
            };
            path.push(i);
            walk(child, path, out);
            path.pop();
        }
    }
    let mut out = Vec::new();
    walk(root, &mut Vec::new(), &mut out);
    out
}

fn at_mut<'a>(root: &'a mut Node, path: &[usize]) -> &'a mut Node {
    path.iter().fold(root, |node, &i| match node {
        Node::Arr(items) => &mut items[i],
        Node::Obj(entries) => &mut entries[i].1,
        _ => unreachable!(),
    })
}

pub fn apply_tree(root: &mut Node, op: &TreeOp) {
    let all = paths(root);
    let pick = |at: &u64| all[(*at % all.len() as u64) as usize].clone();
    match op {
        TreeOp::Retype { at, seed } => {
            let node = at_mut(root, &pick(at));
            let mut rng = Rng::new(*seed);
            let old = std::mem::discriminant(node);
            for _ in 0..4 {
                let new = any_value(&mut rng, 2);
                if std::mem::discriminant(&new) != old {
                    *node = new;
                    break;
                }
            }
        }
        TreeOp::Hostile { at, which } => {
            *at_mut(root, &pick(at)) = Node::Num(HOSTILE_NUMBERS[which % HOSTILE_NUMBERS.len()].to_string());
        }
        TreeOp::Long { at, len, seed } => {
            *at_mut(root, &pick(at)) = Node::Str(long_string(&mut Rng::new(*seed), *len as usize));
        }
        TreeOp::Nest { at, depth, object } => {
            let node = at_mut(root, &pick(at));
            let mut v = std::mem::replace(node, Node::Null);
            for _ in 0..*depth {
                v = if *object {
                    Node::Obj(vec![(quote("a"), v)])
                } else {
                    Node::Arr(vec![v])
                };
            }
            *node = v;
        }
        TreeOp::Empty { at } => match at_mut(root, &pick(at)) {
            Node::Arr(items) => items.clear(),
            Node::Obj(entries) => entries.clear(),
            _ => {}
        },
        TreeOp::Extra { at, seed } => {
            let mut rng = Rng::new(*seed);
            match at_mut(root, &pick(at)) {
                Node::Arr(items) => {
                    let p = rng.below(items.len() + 1);
                    items.insert(p, any_value(&mut rng, 2));
                }
                Node::Obj(entries) => {
                    let p = rng.below(entries.len() + 1);
                    let key = unknown_key(&mut rng);
                    entries.insert(p, (key, any_value(&mut rng, 2)));
                }
                _ => {}
            }
        }
        TreeOp::Remove { at } | TreeOp::Repeat { at, .. } | TreeOp::Rekey { at, .. } => {
            let path = pick(at);
            let Some((&i, parent_path)) = path.split_last() else {
                return;
            };
            match (at_mut(root, parent_path), op) {
                (Node::Arr(items), TreeOp::Remove { .. }) => {
                    items.remove(i);
                }
                (Node::Obj(entries), TreeOp::Remove { .. }) => {
                    entries.remove(i);
                }
                (Node::Arr(items), TreeOp::Repeat { times, .. }) => {
                    let x = items[i].clone();
                    for _ in 0..*times {
                        items.insert(i, x.clone());
                    }
                }
                (Node::Obj(entries), TreeOp::Repeat { times, .. }) => {
                    let x = entries[i].clone();
                    for _ in 0..*times {
                        entries.insert(i + 1, x.clone());
                    }
                }
                (Node::Obj(entries), TreeOp::Rekey { which, .. }) => {
                    entries[i].0 = KEY_SPELLINGS[which % KEY_SPELLINGS.len()].to_string();
                }
                _ => {}
            }
        }
    }
}

// ---- format-aware mutations ---------------------------------------------------------

/// `/infer`-aware mutations of `features`.
#[derive(Clone, Debug)]
pub enum SidecarOp {
    /// Exactly `max_rows + delta - 1` rows (delta 0..3: at, over, far over the limit).
    Rows { delta: u8, seed: u64 },
    /// One row one shorter or longer than `row_len` (or empty).
    RowLen { row: u64, delta: i8 },
    /// A flat row of the wrong length.
    FlatLen { delta: i8, seed: u64 },
    /// A number in the flat form replaced by a row, or a row by a number.
    MixForms { at: u64, seed: u64 },
    /// `features` written twice, the second valid or not.
    DuplicateFeatures { seed: u64, valid: bool, first: bool },
    /// `features` removed or replaced by `null`, `{}`, `[]`, `[[]]`.
    Features { which: u8 },
    /// The body is not an object: an array, a number, a string.
    Top { which: u8 },
}

pub fn sidecar_op() -> impl Strategy<Value = SidecarOp> {
    prop_oneof![
        (0u8..3, any::<u64>()).prop_map(|(delta, seed)| SidecarOp::Rows { delta, seed }),
        (any::<u64>(), prop_oneof![Just(-1i8), Just(1), Just(-100)])
            .prop_map(|(row, delta)| SidecarOp::RowLen { row, delta }),
        (prop_oneof![Just(-1i8), Just(1), Just(-100), Just(50)], any::<u64>())
            .prop_map(|(delta, seed)| SidecarOp::FlatLen { delta, seed }),
        (any::<u64>(), any::<u64>()).prop_map(|(at, seed)| SidecarOp::MixForms { at, seed }),
        (any::<u64>(), any::<bool>(), any::<bool>()).prop_map(|(seed, valid, first)| SidecarOp::DuplicateFeatures {
            seed,
            valid,
            first
        }),
        (0u8..6).prop_map(|which| SidecarOp::Features { which }),
        (0u8..4).prop_map(|which| SidecarOp::Top { which }),
    ]
}

fn row_of(rng: &mut Rng, len: usize) -> Node {
    Node::Arr(numbers(rng, len))
}

fn resized(len: usize, delta: i8) -> usize {
    (len as i64 + delta as i64).max(0) as usize
}

pub fn apply_sidecar(root: &mut Node, op: &SidecarOp, limits: &InputLimits) {
    let row_len = limits.row_len;
    match op {
        SidecarOp::Rows { delta, seed } => {
            let mut rng = Rng::new(*seed);
            let n = match delta {
                0 => limits.max_rows,
                1 => limits.max_rows + 1,
                _ => limits.max_rows + 50,
            };
            let rows = (0..n).map(|_| row_of(&mut rng, row_len)).collect();
            root.set("features", Node::Arr(rows));
        }
        SidecarOp::RowLen { row, delta } => {
            if let Some(Node::Arr(items)) = root.get_mut("features") {
                if let Some(Node::Arr(_)) = items.first() {
                    let i = (*row % items.len() as u64) as usize;
                    if let Node::Arr(xs) = &mut items[i] {
                        xs.resize(resized(row_len, *delta), Node::num(7));
                    }
                } else {
                    items.resize(resized(row_len, *delta), Node::num(7));
                }
            }
        }
        SidecarOp::FlatLen { delta, seed } => {
            let mut rng = Rng::new(*seed);
            root.set("features", row_of(&mut rng, resized(row_len, *delta)));
        }
        SidecarOp::MixForms { at, seed } => {
            let mut rng = Rng::new(*seed);
            if let Some(Node::Arr(items)) = root.get_mut("features") {
                if items.is_empty() {
                    return;
                }
                let i = (*at % items.len() as u64) as usize;
                items[i] = match items[i] {
                    Node::Arr(_) => finite_number(&mut rng),
                    _ => row_of(&mut rng, row_len),
                };
            }
        }
        SidecarOp::DuplicateFeatures { seed, valid, first } => {
            let mut rng = Rng::new(*seed);
            let value = if *valid {
                Node::Arr(vec![row_of(&mut rng, row_len)])
            } else {
                any_value(&mut rng, 2)
            };
            if let Node::Obj(entries) = root {
                let entry = (quote("features"), value);
                if *first {
                    entries.insert(0, entry);
                } else {
                    entries.push(entry);
                }
            }
        }
        SidecarOp::Features { which } => match which {
            0 => root.remove("features"),
            1 => root.set("features", Node::Null),
            2 => root.set("features", Node::obj(vec![])),
            3 => root.set("features", Node::Arr(vec![])),
            4 => root.set("features", Node::Arr(vec![Node::Arr(vec![])])),
            _ => root.set(
                "features",
                Node::Arr(vec![Node::Arr(vec![Node::Arr(vec![Node::num(1)])])]),
            ),
        },
        SidecarOp::Top { which } => {
            let old = std::mem::replace(root, Node::Null);
            *root = match which {
                0 => Node::Arr(vec![old]),
                1 => {
                    let mut old = old;
                    old.get_mut("features").map(std::mem::take).unwrap_or_default()
                }
                2 => Node::num(1),
                _ => Node::str("{\"features\": [1, 2, 3, 4]}"),
            };
        }
    }
}

/// v2-aware mutations of the header (and of the binary part).
#[derive(Clone, Debug)]
pub enum V2Op {
    /// `inputs[0].shape` replaced by one of [`shape_variant`]'s.
    Shape { which: u8 },
    /// `binary_data_size` set to a wrong, huge, negative or non-integer value
    /// (added even when the tensor has JSON `data`: both given).
    BinarySize { which: u8 },
    /// The binary part cut, extended, or given a NaN or infinity.
    Binary { which: u8, at: u64 },
    /// `data` removed from a JSON tensor, or added to a binary one.
    Data { which: u8, seed: u64 },
    /// `outputs` with a repeated, unknown, malformed or many-times-listed name.
    Outputs { which: u8, times: u8 },
    /// `id` of another type, empty, long.
    Id { which: u8 },
    /// `inputs` empty, two tensors, not an array, a tensor not an object.
    Inputs { which: u8 },
    /// `name` / `datatype` wrong, missing, of another type.
    Tensor { which: u8 },
    /// `parameters` (top level) of another shape.
    Params { which: u8 },
    /// The JSON/binary split point moved (a wrong header-length header).
    Split { shift: i16 },
}

pub fn v2_op() -> impl Strategy<Value = V2Op> {
    prop_oneof![
        3 => (0u8..24).prop_map(|which| V2Op::Shape { which }),
        2 => (0u8..12).prop_map(|which| V2Op::BinarySize { which }),
        2 => (0u8..8, any::<u64>()).prop_map(|(which, at)| V2Op::Binary { which, at }),
        1 => (0u8..4, any::<u64>()).prop_map(|(which, seed)| V2Op::Data { which, seed }),
        3 => (0u8..14, prop_oneof![2u8..3, 3u8..40]).prop_map(|(which, times)| V2Op::Outputs { which, times }),
        1 => (0u8..9).prop_map(|which| V2Op::Id { which }),
        1 => (0u8..8).prop_map(|which| V2Op::Inputs { which }),
        1 => (0u8..10).prop_map(|which| V2Op::Tensor { which }),
        1 => (0u8..8).prop_map(|which| V2Op::Params { which }),
        1 => prop_oneof![-8i16..8, Just(i16::MIN), Just(i16::MAX)].prop_map(|shift| V2Op::Split { shift }),
    ]
}

/// Shapes: overflowing, negative, zero, wrong rank and width, non-integers.
fn shape_variant(which: u8, limits: &InputLimits) -> Node {
    let rl = limits.row_len as i64;
    let dims = |ds: &[&str]| Node::Arr(ds.iter().map(|d| Node::Num(d.to_string())).collect());
    let rl_s = rl.to_string();
    let rl = rl_s.as_str();
    let m = limits.max_rows.to_string();
    let m1 = (limits.max_rows + 1).to_string();
    match which {
        0 => dims(&["9223372036854775807", rl]),
        1 => dims(&["-1", rl]),
        2 => dims(&["0", rl]),
        3 => dims(&["-9223372036854775808", rl]),
        4 => dims(&["9223372036854775808", rl]),
        5 => dims(&["18446744073709551615", rl]),
        6 => dims(&["1", "1", "1", "1", "1", "1", "1", "1", "1"]),
        7 => dims(&["1", rl, "1", "1", "1", "1", "1", "1"]),
        8 => dims(&["1", rl, "1"]),
        9 => dims(&["1"]),
        10 => dims(&[]),
        11 => dims(&[&m1, rl]),
        12 => dims(&[&m, rl]),
        13 => dims(&["1", "9223372036854775807"]),
        14 => dims(&["1", "-1"]),
        15 => dims(&["2.0", rl]),
        16 => dims(&["1e0", rl]),
        17 => dims(&["-0", rl]),
        18 => Node::Arr(vec![Node::str("1"), Node::Num(rl.to_string())]),
        19 => Node::Null,
        20 => Node::str("[1, 4]"),
        21 => dims(&["4611686018427387904", "4"]),
        22 => Node::Arr(vec![Node::Arr(vec![Node::num(1)]), Node::Num(rl.to_string())]),
        _ => dims(&[&(i64::MAX / 2).to_string(), "2"]),
    }
}

fn tensor_mut(root: &mut Node) -> Option<&mut Node> {
    match root.get_mut("inputs") {
        Some(Node::Arr(items)) => items.first_mut(),
        _ => None,
    }
}

/// The shape's row count as written, when it is a small positive integer.
fn shape_rows(root: &mut Node) -> Option<usize> {
    match tensor_mut(root)?.get_mut("shape")? {
        Node::Arr(d) => match d.first()? {
            Node::Num(t) => t.parse().ok().filter(|&n| n < 1024),
            _ => None,
        },
        _ => None,
    }
}

pub fn apply_v2(root: &mut Node, binary: &mut Vec<u8>, op: &V2Op, limits: &InputLimits) {
    let rows = shape_rows(root).unwrap_or(1);
    let expected = rows * limits.row_len;
    match op {
        V2Op::Shape { which } => {
            if let Some(t) = tensor_mut(root) {
                t.set("shape", shape_variant(*which, limits));
            }
        }
        V2Op::BinarySize { which } => {
            let size = binary.len();
            let value = match which {
                0 => Node::num(size + 1),
                1 => Node::num(size.saturating_sub(1)),
                2 => Node::num(0),
                3 => Node::num(u64::MAX),
                4 => Node::num("-1"),
                5 => Node::num(format!("{size}.0")),
                6 => Node::num(format!("{size}e0")),
                7 => Node::Str(size.to_string()),
                8 => Node::Null,
                9 => Node::num(4 * (expected + limits.row_len)),
                10 => Node::num("18446744073709551616"),
                _ => Node::num(size),
            };
            if let Some(t) = tensor_mut(root) {
                t.set("parameters", Node::obj(vec![("binary_data_size", value)]));
            }
        }
        V2Op::Binary { which, at } => {
            let n = binary.len();
            let i = (*at as usize) % (n / 4).max(1) * 4;
            match which {
                0 => binary.truncate(pos(*at, n)),
                1 => binary.extend_from_slice(&[0, 0, 0, 0]),
                2 => binary.push(0),
                3..=5 if n >= 4 => {
                    let bits: u32 = match which {
                        3 => 0x7fc0_0000,
                        4 => 0x7f80_0000,
                        _ => 0xff80_0000,
                    };
                    binary[i..i + 4].copy_from_slice(&bits.to_le_bytes());
                }
                6 if n > 0 => binary[pos(*at, n - 1)] ^= 1 << (*at % 8),
                _ => binary.extend_from_slice(&f32::NAN.to_le_bytes()),
            }
        }
        V2Op::Data { which, seed } => {
            let mut rng = Rng::new(*seed);
            let Some(t) = tensor_mut(root) else { return };
            match which {
                0 => t.remove("data"),
                1 => t.set("data", Node::Arr(numbers(&mut rng, expected))),
                2 => t.set("data", Node::Arr(numbers(&mut rng, expected + 1))),
                // Ragged nesting that still flattens to the right count.
                _ => {
                    let mut xs = numbers(&mut rng, expected);
                    let tail = xs.split_off(expected / 2);
                    t.set("data", Node::Arr(vec![Node::Arr(xs), Node::Arr(vec![Node::Arr(tail)])]));
                }
            }
        }
        V2Op::Outputs { which, times } => {
            let named = |name: &str| Node::obj(vec![("name", Node::str(name))]);
            let list = match which {
                0 => vec![named("logits"), named("logits")],
                1 => vec![named("router_weights"); *times as usize],
                2 => vec![named("logits"), named("router_weights"), named("logits")],
                3 => vec![named("probabilities")],
                4 => vec![named("LOGITS")],
                5 => vec![Node::obj(vec![("name", Node::num(5))])],
                6 => vec![Node::obj(vec![(
                    "parameters",
                    Node::obj(vec![("binary_data", Node::Bool(true))]),
                )])],
                7 => vec![Node::obj(vec![
                    ("name", Node::str("logits")),
                    ("parameters", Node::obj(vec![("binary_data", Node::str("yes"))])),
                ])],
                8 => vec![Node::Arr(vec![Node::str("logits")])],
                9 => vec![],
                10 => {
                    root.set("outputs", Node::Null);
                    return;
                }
                11 => vec![named(&"x".repeat(100_000))],
                12 => {
                    let mut o = named("logits");
                    o.push_entry("name", Node::str("router_weights"));
                    vec![o]
                }
                _ => (0..*times)
                    .map(|i| named(["logits", "router_weights", "other"][i as usize % 3]))
                    .collect(),
            };
            root.set("outputs", Node::Arr(list));
        }
        V2Op::Id { which } => {
            let id = match which {
                0 => Node::num(5),
                1 => Node::Null,
                2 => Node::Bool(true),
                3 => Node::Arr(vec![Node::str("a")]),
                4 => Node::obj(vec![("id", Node::str("a"))]),
                5 => Node::str(""),
                6 => Node::Str("\u{0}".repeat(100_000)),
                7 => {
                    root.push_entry("id", Node::str("second"));
                    return;
                }
                _ => Node::Num("1e39".into()),
            };
            root.set("id", id);
        }
        V2Op::Inputs { which } => {
            let tensor = tensor_mut(root).cloned().unwrap_or(Node::Null);
            let inputs = match which {
                0 => Node::Arr(vec![]),
                1 => Node::Arr(vec![tensor.clone(), tensor]),
                2 => Node::Arr(vec![tensor, Node::num(5)]),
                3 => tensor,
                4 => Node::Null,
                5 => Node::Arr(vec![Node::Arr(vec![tensor])]),
                6 => {
                    root.push_entry("inputs", Node::Arr(vec![tensor]));
                    return;
                }
                _ => {
                    root.remove("inputs");
                    return;
                }
            };
            root.set("inputs", inputs);
        }
        V2Op::Tensor { which } => {
            let Some(t) = tensor_mut(root) else { return };
            match which {
                0 => t.set("name", Node::str("Features")),
                1 => t.remove("name"),
                2 => t.set("name", Node::Null),
                3 => t.set("datatype", Node::str("FP16")),
                4 => t.set("datatype", Node::str("fp32")),
                5 => t.remove("datatype"),
                6 => t.set("datatype", Node::num(32)),
                7 => t.remove("shape"),
                8 => t.push_entry("name", Node::str("features")),
                _ => t.push_entry("parameters", Node::obj(vec![])),
            }
        }
        V2Op::Params { which } => {
            let p = match which {
                0 => Node::obj(vec![("binary_data_output", Node::str("true"))]),
                1 => Node::obj(vec![("binary_data_output", Node::Null)]),
                2 => Node::Arr(vec![Node::Bool(true)]),
                3 => Node::Arr(vec![]),
                4 => Node::Arr(vec![Node::Bool(true), Node::Bool(false)]),
                5 => Node::Null,
                6 => Node::num(1),
                _ => {
                    let mut p = Node::obj(vec![("binary_data_output", Node::Bool(true))]);
                    p.push_entry("binary_data_output", Node::Bool(false));
                    p
                }
            };
            root.set("parameters", p);
        }
        // Applied when the body is written (see `split`).
        V2Op::Split { .. } => {}
    }
}

/// Moves the JSON/binary split point of a written request by `shift`
/// bytes (clamped), as a wrong `Inference-Header-Content-Length` would.
pub fn split(json: Vec<u8>, binary: Vec<u8>, shift: i16) -> (Vec<u8>, Vec<u8>) {
    let mut whole = json;
    let at = (whole.len() as i64 + shift as i64).clamp(0, (whole.len() + binary.len()) as i64) as usize;
    whole.extend_from_slice(&binary);
    let rest = whole.split_off(at);
    (whole, rest)
}
