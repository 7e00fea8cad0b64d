//! Parameter views into Lathe's flat parameter buffers.

use std::collections::HashSet;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Errors in a parameter layout.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LayoutError {
    #[error("parameter view has an empty name (at offset {offset})")]
    EmptyName { offset: usize },
    #[error("parameter `{name}` appears twice in the layout")]
    DuplicateName { name: String },
    #[error("parameter `{name}`: shape {shape:?} has too many elements")]
    Overflow { name: String, shape: Vec<usize> },
    #[error(
        "parameter `{name}`: elements {offset}..{end} lie outside the flat buffer of {len} elements"
    )]
    OutOfBounds {
        name: String,
        offset: usize,
        end: usize,
        len: usize,
    },
    #[error("parameters `{first}` and `{second}` overlap in the flat buffer")]
    Overlap { first: String, second: String },
}

/// One parameter: a named, shaped view into the flat buffers (master weights, gradients,
/// optimizer moments, working copy all share the same offsets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamView {
    /// Name, e.g. `h.0.attn.c_attn.weight` (GPT-2 checkpoint names).
    pub name: String,
    /// First element in the flat buffers.
    pub offset: usize,
    /// Row-major shape; the view covers `offset .. offset + product(shape)`.
    pub shape: Vec<usize>,
    /// Whether AdamW's decoupled weight decay (or SGD's L2 term) applies. By GPT-2 convention:
    /// matrices decay, biases, layer-norm gains and (often) embeddings do not.
    pub decay: bool,
}

impl ParamView {
    /// A view; nothing is checked until it joins a [`ParamLayout`].
    pub fn new(name: impl Into<String>, offset: usize, shape: &[usize], decay: bool) -> Self {
        ParamView {
            name: name.into(),
            offset,
            shape: shape.to_vec(),
            decay,
        }
    }

    /// Number of elements (product of the shape; 1 for a scalar shape `[]`). Saturates on
    /// overflow, which [`ParamLayout::new`] rejects.
    pub fn numel(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// The view's element range in the flat buffers.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset.saturating_add(self.numel())
    }
}

/// A validated set of parameter views over flat buffers of `len` elements: names unique and
/// non-empty, every view in bounds, no two views overlapping. Elements covered by no view
/// (padding) are updated like a view with `decay = false`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "LayoutRepr", into = "LayoutRepr")]
pub struct ParamLayout {
    views: Vec<ParamView>,
    len: usize,
    /// Sorted, merged, non-empty ranges of elements with `decay = true`.
    decay_ranges: Vec<Range<usize>>,
}

#[derive(Serialize, Deserialize)]
struct LayoutRepr {
    len: usize,
    views: Vec<ParamView>,
}

impl TryFrom<LayoutRepr> for ParamLayout {
    type Error = LayoutError;
    fn try_from(r: LayoutRepr) -> Result<Self, LayoutError> {
        ParamLayout::new(r.views, r.len)
    }
}

impl From<ParamLayout> for LayoutRepr {
    fn from(l: ParamLayout) -> Self {
        LayoutRepr {
            len: l.len,
            views: l.views,
        }
    }
}

impl ParamLayout {
    /// Validates `views` over buffers of `len` elements. The views keep the given order.
    pub fn new(views: Vec<ParamView>, len: usize) -> Result<Self, LayoutError> {
        let mut names = HashSet::with_capacity(views.len());
        for v in &views {
            if v.name.is_empty() {
                return Err(LayoutError::EmptyName { offset: v.offset });
            }
            if !names.insert(v.name.as_str()) {
                return Err(LayoutError::DuplicateName {
                    name: v.name.clone(),
                });
            }
            let numel = v
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| LayoutError::Overflow {
                    name: v.name.clone(),
                    shape: v.shape.clone(),
                })?;
            let end = v
                .offset
                .checked_add(numel)
                .ok_or_else(|| LayoutError::Overflow {
                    name: v.name.clone(),
                    shape: v.shape.clone(),
                })?;
            if end > len {
                return Err(LayoutError::OutOfBounds {
                    name: v.name.clone(),
                    offset: v.offset,
                    end,
                    len,
                });
            }
        }
        let mut order: Vec<&ParamView> = views.iter().filter(|v| v.numel() > 0).collect();
        order.sort_by_key(|v| v.offset);
        for w in order.windows(2) {
            if w[0].range().end > w[1].offset {
                return Err(LayoutError::Overlap {
                    first: w[0].name.clone(),
                    second: w[1].name.clone(),
                });
            }
        }
        let mut decay_ranges: Vec<Range<usize>> = Vec::new();
        for v in order.iter().filter(|v| v.decay) {
            let r = v.range();
            match decay_ranges.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => decay_ranges.push(r),
            }
        }
        Ok(ParamLayout {
            views,
            len,
            decay_ranges,
        })
    }

    /// Packs `(name, shape, decay)` entries back to back from offset 0 (llm.c's layout);
    /// `len` is the total element count.
    pub fn packed<'a>(
        specs: impl IntoIterator<Item = (&'a str, &'a [usize], bool)>,
    ) -> Result<Self, LayoutError> {
        let mut views = Vec::new();
        let mut offset = 0usize;
        for (name, shape, decay) in specs {
            let v = ParamView::new(name, offset, shape, decay);
            offset = offset
                .checked_add(v.numel())
                .filter(|_| v.numel() != usize::MAX)
                .ok_or_else(|| LayoutError::Overflow {
                    name: name.to_string(),
                    shape: shape.to_vec(),
                })?;
            views.push(v);
        }
        ParamLayout::new(views, offset)
    }

    /// The views, in the order given.
    pub fn views(&self) -> &[ParamView] {
        &self.views
    }

    /// The view called `name`.
    pub fn get(&self, name: &str) -> Option<&ParamView> {
        self.views.iter().find(|v| v.name == name)
    }

    /// Element count of the flat buffers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the flat buffers are empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sorted, merged element ranges that take weight decay.
    pub fn decay_ranges(&self) -> &[Range<usize>] {
        &self.decay_ranges
    }

    /// Splits `range` (global element indices) into consecutive pieces with a constant decay
    /// flag, calling `f(piece, decay)` in ascending order. Pieces cover `range` exactly.
    pub(crate) fn for_each_segment(
        &self,
        range: Range<usize>,
        mut f: impl FnMut(Range<usize>, bool),
    ) {
        let mut pos = range.start;
        // First decay range that ends after `pos`.
        let mut i = self.decay_ranges.partition_point(|r| r.end <= pos);
        while pos < range.end {
            match self.decay_ranges.get(i) {
                Some(r) if r.start < range.end => {
                    if pos < r.start {
                        f(pos..r.start, false);
                        pos = r.start;
                    }
                    let end = r.end.min(range.end);
                    f(pos..end, true);
                    pos = end;
                    i += 1;
                }
                _ => {
                    f(pos..range.end, false);
                    pos = range.end;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(l: &ParamLayout, r: Range<usize>) -> Vec<(Range<usize>, bool)> {
        let mut out = Vec::new();
        l.for_each_segment(r, |r, d| out.push((r, d)));
        out
    }

    #[test]
    fn packed_layout_and_segments() {
        let l = ParamLayout::packed([
            ("wte", &[4usize, 2][..], true),
            ("ln.w", &[2][..], false),
            ("fc.w", &[2, 2][..], true),
            ("fc.b", &[2][..], false),
        ])
        .unwrap();
        assert_eq!(l.len(), 16);
        assert_eq!(l.decay_ranges(), &[0..8, 10..14]);
        assert_eq!(l.get("fc.w").unwrap().range(), 10..14);
        assert_eq!(
            segments(&l, 0..16),
            vec![
                (0..8, true),
                (8..10, false),
                (10..14, true),
                (14..16, false)
            ]
        );
        assert_eq!(
            segments(&l, 5..12),
            vec![(5..8, true), (8..10, false), (10..12, true)]
        );
        assert_eq!(segments(&l, 8..9), vec![(8..9, false)]);
        assert!(segments(&l, 3..3).is_empty());
    }

    #[test]
    fn adjacent_decay_views_merge_and_gaps_do_not_decay() {
        let l = ParamLayout::new(
            vec![
                ParamView::new("b", 4, &[2], true),
                ParamView::new("a", 2, &[2], true),
            ],
            8,
        )
        .unwrap();
        assert_eq!(l.decay_ranges().len(), 1);
        assert_eq!(l.decay_ranges()[0], 2..6);
        assert_eq!(
            segments(&l, 0..8),
            vec![(0..2, false), (2..6, true), (6..8, false)]
        );
    }

    #[test]
    fn invalid_layouts_name_the_parameter() {
        let e = ParamLayout::new(vec![ParamView::new("w", 6, &[3], true)], 8).unwrap_err();
        assert!(e.to_string().contains("`w`"), "{e}");
        let e = ParamLayout::new(
            vec![
                ParamView::new("a", 0, &[4], true),
                ParamView::new("b", 3, &[2], true),
            ],
            8,
        )
        .unwrap_err();
        assert_eq!(
            e,
            LayoutError::Overlap {
                first: "a".into(),
                second: "b".into()
            }
        );
        let e = ParamLayout::new(
            vec![
                ParamView::new("a", 0, &[1], true),
                ParamView::new("a", 1, &[1], true),
            ],
            8,
        )
        .unwrap_err();
        assert!(matches!(e, LayoutError::DuplicateName { .. }));
        assert!(ParamLayout::new(vec![ParamView::new("", 0, &[1], true)], 1).is_err());
        let e =
            ParamLayout::new(vec![ParamView::new("x", 0, &[usize::MAX, 2], true)], 1).unwrap_err();
        assert!(matches!(e, LayoutError::Overflow { .. }));
    }

    #[test]
    fn serde_revalidates() {
        let l = ParamLayout::packed([("a", &[2usize][..], true)]).unwrap();
        let j = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<ParamLayout>(&j).unwrap(), l);
        let bad = j.replace("\"len\":2", "\"len\":1");
        assert!(serde_json::from_str::<ParamLayout>(&bad).is_err());
    }
}
