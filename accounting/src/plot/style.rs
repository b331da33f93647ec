//! Sizes and colours.

use plotters::style::RGBColor;

pub(super) const TITLE_PX: f64 = 20.0;
pub(super) const SUBTITLE_PX: f64 = 14.0;
pub(super) const TICK_PX: f64 = 13.0;
pub(super) const AXIS_PX: f64 = 14.0;
pub(super) const LEGEND_PX: f64 = 14.0;
/// The legend's font when it needs more than one column.
pub(super) const LEGEND_SMALL_PX: f64 = 12.0;
pub(super) const LANE_PX: f64 = 12.0;
pub(super) const MARGIN: i32 = 14;

/// Distinct colours for the series (Tableau 10, with grey replaced, since markers are grey).
pub(super) const PALETTE: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0x39, 0x3b, 0x79),
];
pub(super) const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
pub(super) const MUTED: RGBColor = RGBColor(0x66, 0x66, 0x66);
pub(super) const GRID: RGBColor = RGBColor(0xe4, 0xe4, 0xe4);
pub(super) const FRAME: RGBColor = RGBColor(0x99, 0x99, 0x99);
pub(super) const JOB_LINE: RGBColor = RGBColor(0x44, 0x44, 0x44);
pub(super) const JOB_BAR: RGBColor = RGBColor(0xdd, 0xdd, 0xdd);
pub(super) const STEP_LINE: RGBColor = RGBColor(0x6f, 0x8a, 0xa8);
pub(super) const STEP_BAR: RGBColor = RGBColor(0xd5, 0xe1, 0xef);

/// The colour of series `i`.
pub(super) fn series_color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}
