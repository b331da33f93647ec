//! `ergon plot JOBID -o FILE.svg|FILE.png`: a job's power over time, drawn from the power traces
//! in its manifests.
//!
//! - [`find_in_spools`] and [`read_files`] find and verify the job's manifests (the same
//!   reading as `ergon report`: every `*.json` directly in the spool directories, parsed, kept
//!   when it is the job's, then verified);
//! - [`build`] turns them into a [`Plot`]: one line per trace series per node, the job's and
//!   steps' intervals, the legend's energies and the title (pure, no files);
//! - [`render`] draws a [`Plot`] as SVG or PNG bytes, and [`write`] puts them in place.
//!
//! SVG text needs no font (the viewer draws it). PNG text does: a TrueType font is loaded at run
//! time from `ERGON_PLOT_FONT` or a list of standard paths ([`FONT_PATHS`]) and drawn with
//! `ab_glyph`; without one the PNG is drawn without text and a warning says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ab_glyph::{point, Font as _, FontVec, GlyphId, PxScale, ScaleFont as _};
use ergon_protocol::format;
use ergon_protocol::manifest::Manifest;
use ergon_protocol::StepId;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::collect::combine;

/// Default picture size, pixels.
pub const DEFAULT_WIDTH: u32 = 1200;
/// See [`DEFAULT_WIDTH`].
pub const DEFAULT_HEIGHT: u32 = 600;

/// Where a TrueType font for PNG text is looked for, in order, after `ERGON_PLOT_FONT`:
/// DejaVu Sans (Debian/Ubuntu `fonts-dejavu-core`, Fedora/RHEL `dejavu-sans-fonts`, Arch
/// `ttf-dejavu`), then Liberation Sans, Noto Sans and FreeSans.
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans-fonts/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/google-noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/gnu-free/FreeSans.ttf",
];

/// The environment variable naming a TrueType font file for PNG text.
pub const FONT_ENV: &str = "ERGON_PLOT_FONT";

/// Why a plot could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    /// The output name ends in neither `.svg` nor `.png`.
    #[error("{0}: unsupported output format; the file name must end in .svg or .png")]
    BadExtension(PathBuf),
    /// No manifest of the job was found.
    #[error(
        "no manifests of job {job_id}{cluster} in {dirs}; give manifest files with --manifest PATH"
    )]
    NoManifests {
        /// The job.
        job_id: u32,
        /// `" on cluster X"` or empty.
        cluster: String,
        /// The directories searched.
        dirs: String,
    },
    /// A manifest file could not be read.
    #[error("cannot read manifest {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Manifests of the job did not parse or verify.
    #[error("{} manifest(s) of job {job_id} failed verification, so a plot would be incomplete or wrong: {}", problems.len(), problems.join("; "))]
    Unverified {
        /// The job.
        job_id: u32,
        /// `"<path>: <reason>"` per manifest.
        problems: Vec<String>,
    },
    /// A manifest given with `--manifest` is of another job (or cluster).
    #[error(
        "{path} is the manifest of job {got} on cluster {cluster}, not of job {want}{want_cluster}"
    )]
    OtherJob {
        /// The file.
        path: PathBuf,
        /// Its job.
        got: u32,
        /// Its cluster.
        cluster: String,
        /// The job asked for.
        want: u32,
        /// `" on cluster X"` when one was asked for.
        want_cluster: String,
    },
    /// The job's manifests come from several clusters.
    #[error(
        "job {job_id} has manifests from several clusters ({clusters}); choose one with --cluster"
    )]
    SeveralClusters {
        /// The job.
        job_id: u32,
        /// The clusters, comma-separated.
        clusters: String,
    },
    /// The manifests hold no power trace.
    #[error("the manifests of job {job_id} (node(s) {nodes}) hold no power trace, so there is nothing to plot")]
    NoTrace {
        /// The job.
        job_id: u32,
        /// The nodes, comma-separated.
        nodes: String,
    },
    /// Drawing failed.
    #[error("drawing the plot: {0}")]
    Render(String),
    /// The output could not be written (the file is then as it was).
    #[error("writing the plot: {0}")]
    Write(#[from] ergon_protocol::durable::WriteError),
}

/// The output format, from the file name's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.svg`: vector, text drawn by the viewer.
    Svg,
    /// `.png`: bitmap, text drawn with a TrueType font found at run time.
    Png,
}

impl Format {
    /// The format for `path`'s extension (case-insensitive), or [`PlotError::BadExtension`].
    pub fn from_path(path: &Path) -> Result<Format, PlotError> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => Err(PlotError::BadExtension(path.to_path_buf())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Finding the manifests
// ---------------------------------------------------------------------------------------------

fn cluster_suffix(cluster: Option<&str>) -> String {
    cluster
        .map(|c| format!(" on cluster {c}"))
        .unwrap_or_default()
}

/// The verified manifests of `job_id` (on `cluster`, if given) in the spool directories, read as
/// `ergon report` reads them: every `*.json` directly in each directory (names starting with `.`
/// skipped), parsed, kept when it is the job's, then verified. Files that are not manifests of
/// this schema version are skipped; a manifest of the job that fails verification is an error,
/// since the plot and its totals would silently miss a node.
pub fn find_in_spools(
    spools: &[PathBuf],
    cluster: Option<&str>,
    job_id: u32,
) -> Result<Vec<Manifest>, PlotError> {
    let files = crate::spool::find_job(spools, cluster, job_id);
    for p in &files.unreadable {
        tracing::debug!("skipped {p}");
    }
    let problems = files.unverified;
    let found: Vec<Manifest> = files.found.into_iter().map(|(_, m)| m).collect();
    if !problems.is_empty() {
        return Err(PlotError::Unverified { job_id, problems });
    }
    if found.is_empty() {
        return Err(PlotError::NoManifests {
            job_id,
            cluster: cluster_suffix(cluster),
            dirs: spools
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(found)
}

/// Read and verify the manifest files given on the command line; each must be of `job_id` (and
/// `cluster`, if given).
pub fn read_files(
    paths: &[PathBuf],
    cluster: Option<&str>,
    job_id: u32,
) -> Result<Vec<Manifest>, PlotError> {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        let bytes = crate::spool::read_manifest(path).map_err(|source| PlotError::Read {
            path: path.clone(),
            source,
        })?;
        let m = match Manifest::from_json(&bytes) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        if m.job.job_id != job_id || cluster.is_some_and(|c| c != m.cluster) {
            return Err(PlotError::OtherJob {
                path: path.clone(),
                got: m.job.job_id,
                cluster: m.cluster,
                want: job_id,
                want_cluster: cluster_suffix(cluster),
            });
        }
        found.push(m);
    }
    if !problems.is_empty() {
        return Err(PlotError::Unverified { job_id, problems });
    }
    if found.is_empty() {
        return Err(PlotError::NoManifests {
            job_id,
            cluster: cluster_suffix(cluster),
            dirs: "the files given".into(),
        });
    }
    Ok(found)
}

// ---------------------------------------------------------------------------------------------
// What to draw
// ---------------------------------------------------------------------------------------------

/// Everything drawn, in data units (seconds since the job's start, watts).
#[derive(Debug, Clone, PartialEq)]
pub struct Plot {
    /// `job 42 — total 3.17 kJ (gpu 2.75 kJ / cpu 420 J / dram n/a)`.
    pub title: String,
    /// Cluster, user, nodes, duration (and coverage when incomplete).
    pub subtitle: String,
    /// One per trace series per node, sorted by node, then gpu/socket/dram, then index.
    pub series: Vec<Series>,
    /// `job 42`: the label of the job's interval.
    pub job_label: String,
    /// The job's end, seconds after its start (the earliest node start).
    pub job_end_s: f64,
    /// The job's steps, merged over nodes by step id, in start order.
    pub steps: Vec<StepSpan>,
}

/// One trace series of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// `gpu0`, or `node1/gpu0` when the job spans several nodes.
    pub label: String,
    /// The legend's energy: the manifest's figure (`1.80 kJ`), `n/a` when it is null, or
    /// `≈ 1.80 kJ (trace)` when the manifest has no figure for the device.
    pub energy: String,
    /// The trace as steps: two points per bin, at its start and its end (seconds, watts).
    pub points: Vec<(f64, f64)>,
}

/// One step's interval.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSpan {
    /// `step 0`, `batch`, `extern`, …
    pub label: String,
    /// Start, seconds after the job's start.
    pub start_s: f64,
    /// End, seconds after the job's start.
    pub end_s: f64,
}

fn format_opt(joules: Option<f64>) -> String {
    joules.map_or_else(|| "n/a".into(), format::energy)
}

/// Sort key of a series name: gpus, then sockets, then dram, then anything else; by number.
fn series_key(name: &str) -> (u8, u64, String) {
    let (rank, rest) = if let Some(r) = name.strip_prefix("gpu") {
        (0, r)
    } else if let Some(r) = name.strip_prefix("socket") {
        (1, r)
    } else if let Some(r) = name.strip_prefix("dram") {
        (2, r)
    } else {
        (3, name)
    };
    match rest.parse::<u64>() {
        Ok(n) if rank < 3 => (rank, n, String::new()),
        _ => (3, 0, name.to_owned()),
    }
}

/// The energy the manifest gives for the device of series `name`: `Some(figure)` (itself `None`
/// when the manifest says null), or `None` when the manifest has no entry for it.
fn reported_energy(m: &Manifest, name: &str) -> Option<Option<f64>> {
    let number = |prefix: &str| name.strip_prefix(prefix)?.parse::<u32>().ok();
    if let Some(i) = number("gpu") {
        return m.gpus.iter().find(|g| g.index == i).map(|g| g.energy_j);
    }
    if let Some(i) = number("socket") {
        return m
            .sockets
            .iter()
            .find(|s| s.socket == i)
            .map(|s| Some(s.package_j));
    }
    if let Some(i) = number("dram") {
        return m.sockets.iter().find(|s| s.socket == i).map(|s| s.dram_j);
    }
    None
}

/// What to draw for `job_id` from its verified manifests (one per node, all of one job and
/// cluster).
///
/// Errors: [`PlotError::NoManifests`] for none, [`PlotError::SeveralClusters`] when they come from
/// several clusters, [`PlotError::NoTrace`] when no series has a point.
pub fn build(job_id: u32, manifests: &[Manifest]) -> Result<Plot, PlotError> {
    if manifests.is_empty() {
        return Err(PlotError::NoManifests {
            job_id,
            cluster: String::new(),
            dirs: "(none given)".into(),
        });
    }
    // The same manifest found twice (a spool listed twice, or a file given twice) counts once.
    let mut sorted: Vec<&Manifest> = manifests.iter().collect();
    sorted.sort_by(|a, b| {
        a.node
            .cmp(&b.node)
            .then(a.content_hash.cmp(&b.content_hash))
    });
    sorted.dedup_by(|a, b| a.content_hash == b.content_hash);
    let mut clusters: Vec<&str> = sorted.iter().map(|m| m.cluster.as_str()).collect();
    clusters.sort_unstable();
    clusters.dedup();
    if clusters.len() > 1 {
        return Err(PlotError::SeveralClusters {
            job_id,
            clusters: clusters.join(", "),
        });
    }
    let unique: Vec<Manifest> = sorted.iter().map(|m| (*m).clone()).collect();
    let job = combine(&unique);
    let mut nodes: Vec<&str> = sorted.iter().map(|m| m.node.as_str()).collect();
    nodes.dedup();
    let several_nodes = nodes.len() > 1;
    let start = job.start_unix_ns;
    let rel = |ns: u64| (i128::from(ns) - i128::from(start)) as f64 / 1e9;

    let mut series = Vec::new();
    for m in &sorted {
        let dt = f64::from(m.trace.interval_ms) / 1000.0;
        if m.trace.interval_ms == 0 && m.trace.series.iter().any(|s| !s.watts.is_empty()) {
            tracing::warn!(
                "node {}: the trace has an interval of 0 ms; its series are not drawn",
                m.node
            );
        }
        let t0 = rel(m.trace.start_unix_ns);
        let mut own: Vec<_> = m.trace.series.iter().collect();
        own.sort_by_key(|s| series_key(&s.name));
        for s in own {
            let points: Vec<(f64, f64)> = if dt > 0.0 {
                s.watts
                    .iter()
                    .enumerate()
                    .flat_map(|(k, &w)| {
                        let a = t0 + k as f64 * dt;
                        [(a, f64::from(w)), (a + dt, f64::from(w))]
                    })
                    .filter(|(_, w)| w.is_finite())
                    .collect()
            } else {
                Vec::new()
            };
            let mut energy = match reported_energy(m, &s.name) {
                Some(figure) => format_opt(figure),
                None => {
                    let integrated: f64 = s.watts.iter().map(|&w| f64::from(w)).sum::<f64>() * dt;
                    format!("≈ {} (trace)", format::energy(integrated))
                }
            };
            if points.is_empty() {
                energy.push_str(", no trace");
            }
            series.push(Series {
                label: if several_nodes {
                    format!("{}/{}", m.node, s.name)
                } else {
                    s.name.clone()
                },
                energy,
                points,
            });
        }
    }
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(PlotError::NoTrace {
            job_id,
            nodes: nodes.join(", "),
        });
    }

    let mut merged: BTreeMap<StepId, (u64, u64)> = BTreeMap::new();
    for m in &sorted {
        for s in &m.steps {
            let e = merged
                .entry(s.step)
                .or_insert((s.start_unix_ns, s.end_unix_ns));
            e.0 = e.0.min(s.start_unix_ns);
            e.1 = e.1.max(s.end_unix_ns);
        }
    }
    let mut steps: Vec<StepSpan> = merged
        .into_iter()
        .map(|(id, (a, b))| StepSpan {
            label: match id {
                StepId::Numbered(n) => format!("step {n}"),
                other => other.to_string(),
            },
            start_s: rel(a),
            end_s: rel(b.max(a)),
        })
        .collect();
    steps.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));

    let mut subtitle = format!(
        "cluster {} · user {} · {} node{} · {}",
        job.cluster,
        job.user,
        nodes.len(),
        if several_nodes { "s" } else { "" },
        format::duration(job.duration_s)
    );
    if job.coverage_min < 0.9995 {
        subtitle += &format!(
            " · readings cover {:.0}% of the job",
            job.coverage_min * 100.0
        );
    }
    Ok(Plot {
        title: format!(
            "job {job_id} — total {} (gpu {} / cpu {} / dram {})",
            format::energy(job.energy_j),
            format_opt(job.gpu_j),
            format_opt(job.cpu_j),
            format_opt(job.dram_j)
        ),
        subtitle,
        series,
        job_label: format!("job {job_id}"),
        job_end_s: job.duration_s,
        steps,
    })
}

// ---------------------------------------------------------------------------------------------
// Drawing
// ---------------------------------------------------------------------------------------------

/// The font for PNG text and for measuring text: the first file of `ERGON_PLOT_FONT`, then
/// [`FONT_PATHS`], that reads as a TrueType/OpenType font. Loaded once per process.
fn font() -> Option<&'static (PathBuf, FontVec)> {
    static FONT: OnceLock<Option<(PathBuf, FontVec)>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates = std::env::var_os(FONT_ENV)
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from));
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            match FontVec::try_from_vec(bytes) {
                Ok(f) => {
                    tracing::debug!("font {}", path.display());
                    return Some((path, f));
                }
                Err(_) => tracing::warn!("{} is not a usable TrueType font", path.display()),
            }
        }
        None
    })
    .as_ref()
}

/// The font file PNG text is drawn with, if one is found (see [`FONT_PATHS`]).
pub fn find_font() -> Option<PathBuf> {
    font().map(|(p, _)| p.clone())
}

const TITLE_PX: f64 = 20.0;
const SUBTITLE_PX: f64 = 14.0;
const TICK_PX: f64 = 13.0;
const AXIS_PX: f64 = 14.0;
const LEGEND_PX: f64 = 14.0;
/// The legend's font when it needs more than one column.
const LEGEND_SMALL_PX: f64 = 12.0;
const LANE_PX: f64 = 12.0;
const MARGIN: i32 = 14;

/// Distinct colours for the series (Tableau 10, with grey replaced, since markers are grey).
const PALETTE: [RGBColor; 10] = [
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
const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
const MUTED: RGBColor = RGBColor(0x66, 0x66, 0x66);
const GRID: RGBColor = RGBColor(0xe4, 0xe4, 0xe4);
const FRAME: RGBColor = RGBColor(0x99, 0x99, 0x99);
const JOB_LINE: RGBColor = RGBColor(0x44, 0x44, 0x44);
const JOB_BAR: RGBColor = RGBColor(0xdd, 0xdd, 0xdd);
const STEP_LINE: RGBColor = RGBColor(0x6f, 0x8a, 0xa8);
const STEP_BAR: RGBColor = RGBColor(0xd5, 0xe1, 0xef);

/// The colour of series `i`.
fn series_color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// A text to draw on the bitmap once the shapes are done.
struct TextCmd {
    text: String,
    at: (i32, i32),
    px: f64,
    color: RGBColor,
    pos: Pos,
    rotate: bool,
}

/// Text measuring and drawing. Sizes are plotters' (the SVG's font-size is `px / 1.24`); text
/// is measured with the font when there is one, estimated otherwise. SVG text is written as
/// `<text>` for the viewer to draw; bitmap text is queued and drawn by [`raster_text`] (plotters'
/// own bitmap text needs a font feature, and its `ab_glyph` one misplaces glyphs), or not at
/// all without a font.
struct Texts {
    font: Option<&'static FontVec>,
    /// `Some` for a bitmap: the texts to draw.
    queue: Option<std::cell::RefCell<Vec<TextCmd>>>,
}

/// The ab_glyph scale whose em is plotters' `px / 1.24`, as in the SVG.
fn scale_for(font: &FontVec, px: f64) -> PxScale {
    let em = px as f32 / 1.24;
    let upem = font.units_per_em().unwrap_or(1000.0);
    PxScale::from(em * font.height_unscaled() / upem)
}

/// The advance of each glyph of `text` (kerning included), and the text's width.
fn layout(font: &FontVec, scale: PxScale, text: &str) -> (Vec<(GlyphId, f32)>, f32) {
    let scaled = font.as_scaled(scale);
    let mut caret = 0.0f32;
    let mut prev: Option<GlyphId> = None;
    let mut glyphs = Vec::with_capacity(text.len());
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(p) = prev {
            caret += scaled.kern(p, id);
        }
        glyphs.push((id, caret));
        caret += scaled.h_advance(id);
        prev = Some(id);
    }
    (glyphs, caret)
}

impl Texts {
    /// Whether texts are drawn at all (not on a bitmap without a font).
    fn shown(&self) -> bool {
        self.queue.is_none() || self.font.is_some()
    }

    fn width(&self, text: &str, px: f64) -> i32 {
        match self.font {
            Some(font) => layout(font, scale_for(font, px), text).1.ceil() as i32,
            // About 0.55 em per character in a sans-serif face.
            None => (text.chars().count() as f64 * px / 1.24 * 0.55).ceil() as i32,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn draw<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        text: &str,
        at: (i32, i32),
        px: f64,
        color: &RGBColor,
        pos: Pos,
        rotate: bool,
    ) -> Result<(), PlotError> {
        if text.is_empty() {
            return Ok(());
        }
        if let Some(queue) = &self.queue {
            if self.font.is_some() {
                queue.borrow_mut().push(TextCmd {
                    text: text.to_owned(),
                    at,
                    px,
                    color: *color,
                    pos,
                    rotate,
                });
            }
            return Ok(());
        }
        let mut font = FontDesc::new(FontFamily::SansSerif, px, FontStyle::Normal);
        if rotate {
            font = font.transform(FontTransform::Rotate270);
        }
        let style = TextStyle::from(font).color(color).pos(pos);
        area.draw(&Text::new(text.to_owned(), at, style))
            .map_err(render_err)
    }
}

/// Draw `cmd` into the RGB buffer `rgb` of `width` × `height` pixels, anti-aliased.
fn raster_text(rgb: &mut [u8], (width, height): (u32, u32), font: &FontVec, cmd: &TextCmd) {
    let scale = scale_for(font, cmd.px);
    let scaled = font.as_scaled(scale);
    let (glyphs, text_w) = layout(font, scale, &cmd.text);
    let (ascent, descent) = (scaled.ascent(), scaled.descent());
    // Text coordinates: u along the text from its anchor, v down from it; the baseline is at
    // v = `baseline`.
    let u0 = match cmd.pos.h_pos {
        HPos::Left => 0.0,
        HPos::Center => -text_w / 2.0,
        HPos::Right => -text_w,
    };
    let baseline = match cmd.pos.v_pos {
        VPos::Top => ascent,
        VPos::Center => (ascent + descent) / 2.0,
        VPos::Bottom => descent,
    };
    let (ax, ay) = cmd.at;
    let mut blend = |u: i32, v: i32, coverage: f32| {
        // Rotated a quarter turn counter-clockwise, the text reads upwards.
        let (x, y) = if cmd.rotate {
            (ax + v, ay - u)
        } else {
            (ax + u, ay + v)
        };
        if x < 0 || y < 0 || x >= width as i32 || y >= height as i32 {
            return;
        }
        let a = coverage.clamp(0.0, 1.0);
        let i = (y as usize * width as usize + x as usize) * 3;
        let RGBColor(r, g, b) = cmd.color;
        for (k, c) in [r, g, b].into_iter().enumerate() {
            let old = f32::from(rgb[i + k]);
            rgb[i + k] = (old + (f32::from(c) - old) * a).round() as u8;
        }
    };
    for (id, caret) in glyphs {
        let glyph = id.with_scale_and_position(scale, point(u0 + caret, baseline));
        if let Some(outlined) = font.outline_glyph(glyph) {
            let bounds = outlined.px_bounds();
            outlined.draw(|gx, gy, c| {
                blend(
                    bounds.min.x as i32 + gx as i32,
                    bounds.min.y as i32 + gy as i32,
                    c,
                )
            });
        }
    }
}

fn render_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::Render(e.to_string())
}

/// The round step (1, 2, 2.5 or 5 times a power of ten) closest to `target` intervals over
/// `lo..=hi`.
fn tick_step(lo: f64, hi: f64, target: usize) -> f64 {
    let raw = (hi - lo).max(f64::EPSILON) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|f| f * mag)
        .min_by(|a, b| (a / raw).ln().abs().total_cmp(&(b / raw).ln().abs()))
        .unwrap_or(mag)
}

/// The multiples of `step` in `lo..=hi`.
fn ticks_of(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// Round tick positions covering `lo..=hi` with about `target` intervals; their step too.
fn ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let step = tick_step(lo, hi, target);
    (ticks_of(lo, hi, step), step)
}

/// A tick's label with as many decimals as its step needs.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = (0..6)
        .find(|d| {
            let scaled = step * 10f64.powi(*d);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(6) as usize;
    let text = format!("{v:.decimals$}");
    if text
        .trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        "0".into()
    } else {
        text
    }
}

/// The pixel column of time `t` on an axis from `lo..hi` drawn from pixel `left` to `right`.
fn x_pixel(t: f64, (lo, hi): (f64, f64), (left, right): (i32, i32)) -> i32 {
    left + ((t - lo) / (hi - lo) * f64::from(right - left)).round() as i32
}

/// How the legend is laid out.
struct Legend {
    /// Font size.
    px: f64,
    /// Row height, pixels.
    row: i32,
    /// Column width, pixels.
    col_w: i32,
    /// Columns.
    cols: usize,
    /// Rows per column (below the header row).
    rows: usize,
    /// Entries shown; the rest are counted in the last slot.
    shown: usize,
}

/// One bar in the lane above the plot.
struct LaneItem<'a> {
    label: &'a str,
    x0: i32,
    x1: i32,
    row: usize,
    labelled: bool,
}

/// Legend swatch width, pixels.
const SWATCH: i32 = 22;

/// The legend for a space `height` high, taking at most half of `width`: as many columns as the
/// series need, in a smaller font when one is not enough; what does not fit is counted in the
/// last slot.
fn legend_layout(plot: &Plot, texts: &Texts, height: i32, width: i32) -> Legend {
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
fn lane_layout<'a>(
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

/// Draw `plot` on `area`.
fn draw<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    plot: &Plot,
    texts: &Texts,
) -> Result<(), PlotError> {
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    area.fill(&WHITE).map_err(render_err)?;

    // Data ranges.
    let all = plot.series.iter().flat_map(|s| s.points.iter());
    let (mut t_lo, mut t_hi, mut w_lo, mut w_hi) = (0.0f64, plot.job_end_s, 0.0f64, 0.0f64);
    for &(t, p) in all {
        t_lo = t_lo.min(t);
        t_hi = t_hi.max(t);
        w_lo = w_lo.min(p);
        w_hi = w_hi.max(p);
    }
    for s in &plot.steps {
        t_lo = t_lo.min(s.start_s);
        t_hi = t_hi.max(s.end_s);
    }
    if t_hi - t_lo <= 0.0 {
        t_hi = t_lo + 1.0;
    }
    let pad = (t_hi - t_lo) * 0.01;
    let (x_lo, x_hi) = (t_lo - pad, t_hi + pad);
    // Time unit for the axis: seconds, minutes or hours.
    let (unit, unit_s) = match t_hi - t_lo {
        d if d <= 600.0 => ("s", 1.0),
        d if d <= 3.0 * 3600.0 => ("min", 60.0),
        _ => ("h", 3600.0),
    };

    // Title lines, shrunk to fit the width.
    let fit = |text: &str, mut px: f64| {
        while px > 8.0 && texts.width(text, px) > w - 2 * MARGIN {
            px -= 1.0;
        }
        px
    };
    let title_px = fit(&plot.title, TITLE_PX);
    let subtitle_px = fit(&plot.subtitle, SUBTITLE_PX);
    let mut y = MARGIN;
    texts.draw(
        area,
        &plot.title,
        (w / 2, y),
        title_px,
        &INK,
        Pos::new(HPos::Center, VPos::Top),
        false,
    )?;
    y += (title_px * 1.35) as i32;
    texts.draw(
        area,
        &plot.subtitle,
        (w / 2, y),
        subtitle_px,
        &MUTED,
        Pos::new(HPos::Center, VPos::Top),
        false,
    )?;
    y += (subtitle_px * 1.5) as i32;
    let header_bottom = y;

    // Horizontal layout: y-axis title and tick labels on the left, the legend on the right.
    let y_target = ((h - 200) / 55).clamp(3, 10) as usize;
    let y_lo = w_lo.min(0.0);
    let raw_hi = if w_hi > 0.0 { w_hi * 1.05 } else { 1.0 };
    let y_step = tick_step(y_lo, raw_hi, y_target);
    let y_hi = (raw_hi / y_step).ceil() * y_step;
    let y_ticks = ticks_of(y_lo, y_hi, y_step);
    let y_labels: Vec<String> = y_ticks.iter().map(|v| tick_label(*v, y_step)).collect();
    let y_label_w = y_labels
        .iter()
        .map(|l| texts.width(l, TICK_PX))
        .max()
        .unwrap_or(0);
    let axis_title_h = (AXIS_PX * 1.2) as i32;
    let left = MARGIN + axis_title_h + 8 + y_label_w + 8;

    // Vertical layout: the lane (job and steps) under the title, the x axis at the bottom.
    let x_axis_h = 6 + (TICK_PX * 1.3) as i32 + 6 + (AXIS_PX * 1.3) as i32;
    let bottom = h - MARGIN - x_axis_h;
    let lane_row = (LANE_PX * 1.7) as i32;
    let lane_top = header_bottom;
    // Rows for steps below the job's row, at most a third of the height in all; a step whose
    // label fits in none gets an unlabelled bar.
    let max_step_rows = (((bottom - header_bottom) / 3 / lane_row) - 1).clamp(2, 8) as usize;
    // The legend spans the lane's and the plot's height, so its columns do not depend on the
    // lane, whose rows depend on the plot's width.
    let Legend {
        px: legend_px,
        row: legend_row,
        col_w,
        cols,
        rows: rows_per_col,
        shown,
    } = legend_layout(plot, texts, bottom - lane_top, w - left - MARGIN);
    let right = (w - MARGIN - cols as i32 * col_w - 14).max(left + 50);
    let items = lane_layout(
        plot,
        texts,
        |t| x_pixel(t, (x_lo, x_hi), (left, right)),
        max_step_rows,
    );
    let lane_rows = items.iter().map(|i| i.row as i32 + 1).max().unwrap_or(1);
    let top = lane_top + lane_rows * lane_row + 6;
    let x_of = |t: f64| x_pixel(t, (x_lo, x_hi), (left, right));
    let y_of =
        |p: f64| bottom - ((p - y_lo) / (y_hi - y_lo) * f64::from(bottom - top)).round() as i32;

    // Grid and frame.
    let (x_ticks, x_step) = ticks(
        x_lo / unit_s,
        x_hi / unit_s,
        (((right - left) / 90).clamp(2, 14)) as usize,
    );
    for v in &y_ticks {
        let py = y_of(*v);
        area.draw(&PathElement::new(vec![(left, py), (right, py)], GRID))
            .map_err(render_err)?;
    }
    for v in &x_ticks {
        let px = x_of(v * unit_s);
        area.draw(&PathElement::new(vec![(px, top), (px, bottom)], GRID))
            .map_err(render_err)?;
    }

    // Step and job boundaries: lines from their bar down through the plot.
    let bar_bottom = |row: usize| lane_top + (row as i32 + 1) * lane_row - 3;
    for item in items.iter().skip(1) {
        for x in [item.x0, item.x1] {
            area.draw(&DashedPathElement::new(
                vec![(x, bar_bottom(item.row)), (x, bottom)],
                4,
                3,
                STEP_LINE,
            ))
            .map_err(render_err)?;
        }
    }
    for x in [items[0].x0, items[0].x1] {
        area.draw(&PathElement::new(
            vec![(x, bar_bottom(0)), (x, bottom)],
            JOB_LINE.stroke_width(1),
        ))
        .map_err(render_err)?;
    }

    // The lane's bars and labels over the lines.
    for (i, item) in items.iter().enumerate() {
        let y0 = lane_top + item.row as i32 * lane_row + 1;
        let y1 = bar_bottom(item.row);
        let (fill, edge) = if i == 0 {
            (JOB_BAR, JOB_LINE)
        } else {
            (STEP_BAR, STEP_LINE)
        };
        if item.labelled && texts.shown() {
            let text_end = item.x0 + 4 + texts.width(item.label, LANE_PX) + 2;
            if text_end > item.x1 {
                area.draw(&Rectangle::new(
                    [(item.x1, y0), (text_end, y1)],
                    WHITE.filled(),
                ))
                .map_err(render_err)?;
            }
        }
        area.draw(&Rectangle::new(
            [(item.x0, y0), (item.x1, y1)],
            fill.filled(),
        ))
        .map_err(render_err)?;
        area.draw(&Rectangle::new([(item.x0, y0), (item.x1, y1)], edge))
            .map_err(render_err)?;
        if item.labelled {
            texts.draw(
                area,
                item.label,
                (item.x0 + 4, (y0 + y1) / 2),
                LANE_PX,
                &INK,
                Pos::new(HPos::Left, VPos::Center),
                false,
            )?;
        }
    }

    // The series, over everything else in the plot.
    for (i, s) in plot.series.iter().enumerate() {
        if s.points.is_empty() {
            continue;
        }
        let pts: Vec<(i32, i32)> = s.points.iter().map(|&(t, p)| (x_of(t), y_of(p))).collect();
        area.draw(&PathElement::new(pts, series_color(i).stroke_width(2)))
            .map_err(render_err)?;
    }
    area.draw(&Rectangle::new([(left, top), (right, bottom)], FRAME))
        .map_err(render_err)?;

    // Axes: ticks, their labels and the titles.
    for (v, label) in y_ticks.iter().zip(&y_labels) {
        let py = y_of(*v);
        area.draw(&PathElement::new(vec![(left - 5, py), (left, py)], FRAME))
            .map_err(render_err)?;
        texts.draw(
            area,
            label,
            (left - 8, py),
            TICK_PX,
            &INK,
            Pos::new(HPos::Right, VPos::Center),
            false,
        )?;
    }
    for v in &x_ticks {
        let px = x_of(v * unit_s);
        area.draw(&PathElement::new(
            vec![(px, bottom), (px, bottom + 5)],
            FRAME,
        ))
        .map_err(render_err)?;
        texts.draw(
            area,
            &tick_label(*v, x_step),
            (px, bottom + 8),
            TICK_PX,
            &INK,
            Pos::new(HPos::Center, VPos::Top),
            false,
        )?;
    }
    texts.draw(
        area,
        &format!("time since job start ({unit})"),
        ((left + right) / 2, h - MARGIN),
        AXIS_PX,
        &INK,
        Pos::new(HPos::Center, VPos::Bottom),
        false,
    )?;
    texts.draw(
        area,
        "power (W)",
        (MARGIN, (top + bottom) / 2),
        AXIS_PX,
        &INK,
        Pos::new(HPos::Center, VPos::Top),
        true,
    )?;

    // The legend, right of the plot, in as many columns as it needs.
    let lx = right + 14;
    for col in 0..cols as i32 {
        texts.draw(
            area,
            "energy",
            (lx + col * col_w + col_w - 10, lane_top + legend_row / 2),
            TICK_PX,
            &MUTED,
            Pos::new(HPos::Right, VPos::Center),
            false,
        )?;
    }
    let slot = |i: usize| {
        let col = (i / rows_per_col) as i32;
        let row = (i % rows_per_col) as i32 + 1;
        (
            lx + col * col_w + 10,
            lane_top + row * legend_row + legend_row / 2,
        )
    };
    if shown < plot.series.len() {
        let (x, yc) = slot(shown);
        texts.draw(
            area,
            &format!("… and {} more", plot.series.len() - shown),
            (x, yc),
            legend_px,
            &MUTED,
            Pos::new(HPos::Left, VPos::Center),
            false,
        )?;
    }
    for (i, s) in plot.series.iter().enumerate().take(shown) {
        let col = (i / rows_per_col) as i32;
        let row = (i % rows_per_col) as i32 + 1;
        let x = lx + col * col_w + 10;
        let yc = lane_top + row * legend_row + legend_row / 2;
        area.draw(&Rectangle::new(
            [(x, yc - 2), (x + SWATCH, yc + 2)],
            series_color(i).filled(),
        ))
        .map_err(render_err)?;
        texts.draw(
            area,
            &s.label,
            (x + SWATCH + 8, yc),
            legend_px,
            &INK,
            Pos::new(HPos::Left, VPos::Center),
            false,
        )?;
        texts.draw(
            area,
            &s.energy,
            (x + col_w - 20, yc),
            legend_px,
            &INK,
            Pos::new(HPos::Right, VPos::Center),
            false,
        )?;
    }
    Ok(())
}

/// `plot` drawn as `format`, `width` × `height` pixels: the file's bytes.
pub fn render(plot: &Plot, format: Format, width: u32, height: u32) -> Result<Vec<u8>, PlotError> {
    let font = font().map(|(_, f)| f);
    match format {
        Format::Svg => {
            let mut svg = String::new();
            {
                let area = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
                draw(&area, plot, &Texts { font, queue: None })?;
                area.present().map_err(render_err)?;
            }
            Ok(svg.into_bytes())
        }
        Format::Png => {
            if font.is_none() {
                tracing::warn!(
                    "no TrueType font found (set {FONT_ENV} to a .ttf file, or install fonts-dejavu-core); the PNG has no text: use .svg for a labelled plot"
                );
            }
            let texts = Texts {
                font,
                queue: Some(Default::default()),
            };
            let mut rgb = vec![0u8; width as usize * height as usize * 3];
            {
                let area =
                    BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
                draw(&area, plot, &texts)?;
                area.present().map_err(render_err)?;
            }
            if let (Some(font), Some(queue)) = (font, texts.queue) {
                for cmd in queue.into_inner() {
                    raster_text(&mut rgb, (width, height), font, &cmd);
                }
            }
            let mut out = Vec::new();
            let mut encoder = png::Encoder::new(&mut out, width, height);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header().map_err(render_err)?;
            writer.write_image_data(&rgb).map_err(render_err)?;
            writer.finish().map_err(render_err)?;
            Ok(out)
        }
    }
}

/// Put the plot in place at `path`: atomically, so an existing file is replaced only by a
/// complete plot.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), PlotError> {
    Ok(ergon_protocol::durable::write(path, bytes, 0o666)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_extension() {
        assert_eq!(
            Format::from_path(Path::new("a/b.svg")).unwrap(),
            Format::Svg
        );
        assert_eq!(Format::from_path(Path::new("b.PNG")).unwrap(), Format::Png);
        for bad in ["b.pdf", "b", "svg", "b.svg.gz"] {
            let e = Format::from_path(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains(".svg") && e.contains(".png"), "{e}");
        }
    }

    #[test]
    fn ticks_are_round() {
        let (t, step) = ticks(0.0, 315.0, 6);
        assert_eq!(step, 50.0);
        assert_eq!(t, vec![0.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0]);
        let (t, step) = ticks(-0.1, 3.6, 7);
        assert_eq!(step, 0.5);
        assert_eq!(t.first(), Some(&0.0));
        assert_eq!(tick_label(2.5, 0.5), "2.5");
        assert_eq!(tick_label(0.25, 0.25), "0.25");
        assert_eq!(tick_label(300.0, 50.0), "300");
        assert_eq!(tick_label(-0.0, 0.5), "0");
    }

    #[test]
    fn series_order() {
        let mut names = vec![
            "dram0", "gpu10", "socket1", "gpu2", "nic0", "socket0", "gpu0",
        ];
        names.sort_by_key(|n| series_key(n));
        assert_eq!(
            names,
            ["gpu0", "gpu2", "gpu10", "socket0", "socket1", "dram0", "nic0"]
        );
    }
}
