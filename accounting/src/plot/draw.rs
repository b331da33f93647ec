//! Drawing a [`Plot`] on a plotters area: axes, grid, the series, the job and step lanes, the
//! legend.

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::axes::{tick_label, tick_step, ticks, ticks_of, x_pixel};
use super::error::{render_err, PlotError};
use super::layout::{lane_layout, legend_layout, Legend, SWATCH};
use super::model::Plot;
use super::style::*;
use super::text::Texts;

/// Draw `plot` on `area`.
pub(super) fn draw<DB: DrawingBackend>(
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
