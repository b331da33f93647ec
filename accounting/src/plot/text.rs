//! Text: the font found at run time, measuring, and drawing (SVG `<text>` for the viewer, or
//! anti-aliased glyphs rastered into a bitmap).

use std::path::PathBuf;
use std::sync::OnceLock;

use ab_glyph::{point, Font as _, FontVec, GlyphId, PxScale, ScaleFont as _};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::error::{render_err, PlotError};

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

/// The font for PNG text and for measuring text: the first file of `ERGON_PLOT_FONT`, then
/// [`FONT_PATHS`], that reads as a TrueType/OpenType font. Loaded once per process.
pub(super) fn font() -> Option<&'static (PathBuf, FontVec)> {
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

/// A text to draw on the bitmap once the shapes are done.
pub(super) struct TextCmd {
    pub(super) text: String,
    pub(super) at: (i32, i32),
    pub(super) px: f64,
    pub(super) color: RGBColor,
    pub(super) pos: Pos,
    pub(super) rotate: bool,
}

/// Text measuring and drawing. Sizes are plotters' (the SVG's font-size is `px / 1.24`); text
/// is measured with the font when there is one, estimated otherwise. SVG text is written as
/// `<text>` for the viewer to draw; bitmap text is queued and drawn by [`raster_text`] (plotters'
/// own bitmap text needs a font feature, and its `ab_glyph` one misplaces glyphs), or not at
/// all without a font.
pub(super) struct Texts {
    pub(super) font: Option<&'static FontVec>,
    /// `Some` for a bitmap: the texts to draw.
    pub(super) queue: Option<std::cell::RefCell<Vec<TextCmd>>>,
}

/// The ab_glyph scale whose em is plotters' `px / 1.24`, as in the SVG.
pub(super) fn scale_for(font: &FontVec, px: f64) -> PxScale {
    let em = px as f32 / 1.24;
    let upem = font.units_per_em().unwrap_or(1000.0);
    PxScale::from(em * font.height_unscaled() / upem)
}

/// The advance of each glyph of `text` (kerning included), and the text's width.
pub(super) fn layout(font: &FontVec, scale: PxScale, text: &str) -> (Vec<(GlyphId, f32)>, f32) {
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
    pub(super) fn shown(&self) -> bool {
        self.queue.is_none() || self.font.is_some()
    }

    pub(super) fn width(&self, text: &str, px: f64) -> i32 {
        match self.font {
            Some(font) => layout(font, scale_for(font, px), text).1.ceil() as i32,
            // About 0.55 em per character in a sans-serif face.
            None => (text.chars().count() as f64 * px / 1.24 * 0.55).ceil() as i32,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn draw<DB: DrawingBackend>(
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
pub(super) fn raster_text(
    rgb: &mut [u8],
    (width, height): (u32, u32),
    font: &FontVec,
    cmd: &TextCmd,
) {
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
