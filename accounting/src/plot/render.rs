//! [`render()`]: a [`Plot`] as SVG or PNG bytes; [`write()`]: the file put in place.

use std::path::Path;

use plotters::prelude::*;

use super::draw::draw;
use super::error::{render_err, Format, PlotError};
use super::model::Plot;
use super::text::{font, raster_text, Texts, FONT_ENV};

/// Default picture size, pixels.
pub const DEFAULT_WIDTH: u32 = 1200;
/// See [`DEFAULT_WIDTH`].
pub const DEFAULT_HEIGHT: u32 = 600;

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
