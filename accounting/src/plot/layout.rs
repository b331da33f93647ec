//! Where the legend's entries and the lane's job and step bars go.

use super::model::Plot;
use super::style::{LANE_PX, LEGEND_PX, LEGEND_SMALL_PX, TICK_PX};
use super::text::Texts;

/// How the legend is laid out.
pub(super) struct Legend {
    /// Font size.
    pub(super) px: f64,
    /// Row height, pixels.
    pub(super) row: i32,
    /// Column width, pixels.
    pub(super) col_w: i32,
    /// Columns.
    pub(super) cols: usize,
    /// Rows per column (below the header row).
    pub(super) rows: usize,
    /// Entries shown; the rest are counted in the last slot.
    pub(super) shown: usize,
}

/// One bar in the lane above the plot.
pub(super) struct LaneItem<'a> {
    pub(super) label: &'a str,
    pub(super) x0: i32,
    pub(super) x1: i32,
    pub(super) row: usize,
    pub(super) labelled: bool,
}

/// Legend swatch width, pixels.
pub(super) const SWATCH: i32 = 22;

/// The legend for a space `height` high, taking at most half of `width`: as many columns as the
/// series need, in a smaller font when one is not enough; what does not fit is counted in the
/// last slot.
pub(super) fn legend_layout(plot: &Plot, texts: &Texts, height: i32, width: i32) -> Legend {
    let fit = |px: f64| {
        let row = (px * 1.5) as i32;
        let name_w = plot
            .series
            .iter()
            .map(|s| texts.width(&s.label, px))
            .max()
            .unwrap_or(0);
        let energy_w = plot
            .series
            .iter()
            .map(|s| texts.width(&s.energy, px))
            .chain([texts.width("energy", TICK_PX)])
            .max()
            .unwrap_or(0);
        let col_w = 10 + SWATCH + 8 + name_w + 16 + energy_w + 10;
        let fit_rows = ((height.max(row * 2) - row) / row).max(1) as usize;
        let n = plot.series.len();
        let max_cols = ((width / 2) / col_w).max(1) as usize;
        let cols = n.div_ceil(fit_rows).clamp(1, max_cols);
        let rows = n.div_ceil(cols).clamp(1, fit_rows);
        let shown = if n <= cols * rows { n } else { cols * rows - 1 };
        Legend {
            px,
            row,
            col_w,
            cols,
            rows,
            shown,
        }
    };
    match fit(LEGEND_PX) {
        big if big.cols == 1 && big.shown == plot.series.len() => big,
        _ => fit(LEGEND_SMALL_PX),
    }
}

/// The lane above the plot, with time mapped to pixels by `x_of`: row 0 is the job; each step
/// goes into the first of at most `max_step_rows` rows below where its label fits, or, when
/// none has room, unlabelled into the row that ends first.
pub(super) fn lane_layout<'a>(
    plot: &'a Plot,
    texts: &Texts,
    x_of: impl Fn(f64) -> i32,
    max_step_rows: usize,
) -> Vec<LaneItem<'a>> {
    let mut items = vec![LaneItem {
        label: &plot.job_label,
        x0: x_of(0.0),
        x1: x_of(plot.job_end_s).max(x_of(0.0) + 2),
        row: 0,
        labelled: true,
    }];
    let mut row_ends: Vec<i32> = Vec::new();
    for s in &plot.steps {
        let x0 = x_of(s.start_s);
        let x1 = x_of(s.end_s).max(x0 + 2);
        let occupied = x1.max(x0 + 4 + texts.width(&s.label, LANE_PX) + 6);
        let free = row_ends.iter().position(|end| *end + 4 <= x0);
        let (row, labelled) = match free {
            Some(r) => (r, true),
            None if row_ends.len() < max_step_rows => {
                row_ends.push(i32::MIN);
                (row_ends.len() - 1, true)
            }
            None => {
                let r = (0..row_ends.len())
                    .min_by_key(|r| row_ends[*r])
                    .unwrap_or(0);
                (r, false)
            }
        };
        row_ends[row] = row_ends[row].max(if labelled { occupied } else { x1 });
        items.push(LaneItem {
            label: &s.label,
            x0,
            x1,
            row: row + 1,
            labelled,
        });
    }
    items
}
