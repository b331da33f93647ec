//! `ergon plot JOBID -o FILE.svg|FILE.png`: a job's power over time, drawn from the power traces
//! in its manifests.
//!
//! - [`find_in_spools`] and [`read_files`] find and verify the job's manifests (the same
//!   reading as `ergon report`: every `*.json` directly in the spool directories, parsed, kept
//!   when it is the job's, then verified);
//! - [`build`] turns them into a [`Plot`]: one line per trace series per node, the job's and
//!   steps' intervals, the legend's energies and the title (pure, no files);
//! - [`render()`] draws a [`Plot`] as SVG or PNG bytes, and [`write()`] puts them in place.
//!
//! SVG text needs no font (the viewer draws it). PNG text does: a TrueType font is loaded at run
//! time from `ERGON_PLOT_FONT` or a list of standard paths ([`FONT_PATHS`]) and drawn with
//! `ab_glyph`; without one the PNG is drawn without text and a warning says so.
//!
//! Modules, leaves first (none uses one listed after it): `error` ([`PlotError`], [`Format`]),
//! `files` (finding the manifests), `model` ([`build`], [`Plot`]), `style` (sizes, colours),
//! `text` (fonts, measuring, rastering), `axes` (ticks), `layout` (legend and lanes), `draw`
//! and `render` ([`render()`], [`write()`]).

mod axes;
mod draw;
mod error;
mod files;
mod layout;
mod model;
mod render;
mod style;
mod text;

pub use error::{Format, PlotError};
pub use files::{find_in_spools, read_files};
pub use model::{build, Plot, Series, StepSpan};
pub use render::{render, write, DEFAULT_HEIGHT, DEFAULT_WIDTH};
pub use text::{find_font, FONT_ENV, FONT_PATHS};
