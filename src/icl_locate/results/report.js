// The report's Explore section (see interactive.py): plotly charts of the curves and head maps from the page's
// JSON, filters by task / condition / seed, and on a click the stored generations of the first test items.
// Every text from the store is put in the page with textContent, never parsed as HTML.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("explore-data").textContent);
  var charts = document.getElementById("explore-charts");
  var filters = { task: "all", condition: "all", seed: "all" };
  var config = { displaylogo: false, responsive: true };
  var panels = [];

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function fmt(x) {
    return x === null || x === undefined ? "n/a" : Number(x).toFixed(2);
  }

  function shown(entry) {
    return (
      (filters.task === "all" || entry.task === filters.task) &&
      (filters.condition === "all" || entry.condition === filters.condition) &&
      entry.views.indexOf(filters.seed) >= 0
    );
  }

  // ------------------------------------------------------------------ filters

  function fillFilter(name, values, allLabel) {
    var select = document.getElementById("filter-" + name);
    select.appendChild(new Option(allLabel, "all"));
    values.forEach(function (v) {
      select.appendChild(new Option(name === "seed" ? "seed " + v : v, v));
    });
    select.addEventListener("change", function () {
      filters[name] = select.value;
      render();
    });
  }

  function distinct(key) {
    var seen = [];
    data.curves.concat(data.heads).forEach(function (e) {
      (key === "seed" ? e.seeds : [e[key]]).forEach(function (v) {
        if (seen.indexOf(v) < 0) seen.push(v);
      });
    });
    return seen.sort(function (a, b) {
      return isNaN(a) || isNaN(b) ? String(a).localeCompare(String(b)) : Number(a) - Number(b);
    });
  }

  // ------------------------------------------------------------------ the generations panel

  function promptNode(item, hidden) {
    if (item.prompt === null) return el("p", "prompt missing", "prompt not stored (a store written before prompts were kept)");
    var text = data.prompts[item.prompt];
    var pre = el("pre", "prompt");
    var at = 0;
    (hidden || []).forEach(function (span) {
      pre.appendChild(document.createTextNode(text.slice(at, span[0])));
      pre.appendChild(el("mark", "hidden", text.slice(span[0], span[1])));
      at = span[1];
    });
    pre.appendChild(document.createTextNode(text.slice(at)));
    return pre;
  }

  function generationBox(className, title, row, other, otherName) {
    var box = el("div", "generation " + className);
    var head = el("div", "generation-title", title + (row && row.score !== null ? " (score " + fmt(row.score) + ")" : ""));
    box.appendChild(head);
    if (other !== undefined) {
      var same = row && other && row.generation === other.generation;
      head.appendChild(el("span", "badge " + (same ? "same" : "differs"), same ? "same as " + otherName : "differs"));
    }
    box.appendChild(el("pre", "text", row ? row.generation : "not stored"));
    return box;
  }

  // The panel of one row: per item the prompt (marked), this row's generation, the reference row's
  // (baseKey, titled baseTitle, called baseName in the same/differs badge) and the reference answer.
  function showRows(panel, heading, note, unitId, rowKey, baseKey, baseTitle, baseName) {
    var unit = data.units[unitId];
    var rows = unit.rows[rowKey] || [];
    var base = baseKey ? unit.rows[baseKey] || [] : [];
    panel.textContent = "";
    panel.hidden = false;
    panel.dataset.row = rowKey;
    panel.appendChild(el("h4", "detail-title", heading));
    panel.appendChild(el("p", "note", note));
    function of(list, item) {
      return list.filter(function (r) {
        return r.item === item.item;
      })[0];
    }
    unit.items.forEach(function (item) {
      var row = of(rows, item), baseRow = baseKey ? of(base, item) : undefined;
      var box = el("div", "item");
      box.dataset.item = item.item;
      box.appendChild(el("div", "item-title", "item " + item.item + " (" + item.example_id + ")"));
      box.appendChild(promptNode(item, row ? row.hidden : []));
      var pair = el("div", "pair");
      pair.appendChild(generationBox("at-row", "this row", row, baseKey ? baseRow || null : undefined, baseName));
      pair.appendChild(baseKey ? generationBox("baseline", baseTitle, baseRow) : el("p", "note", "no row with nothing hidden in this sweep"));
      box.appendChild(pair);
      var ref = el("div", "reference");
      ref.appendChild(el("div", "generation-title", "reference"));
      ref.appendChild(el("pre", "text", item.reference));
      box.appendChild(ref);
      panel.appendChild(box);
    });
  }

  function seedNote(entry) {
    if (entry.seed !== "all" || entry.seeds.length === 1) return "seed " + entry.unit_seed;
    return "seed " + entry.unit_seed + " (the first of seeds " + entry.seeds.join(", ") + ")";
  }

  function curveClick(panel, c, layer) {
    var what;
    if (c.baseline_row === c.variant + "@" + layer) what = (c.kind === "mask" ? "nothing hidden" : "no attention removed") + " (the baseline row)";
    else if (c.kind !== "mask") what = "layer " + layer + "'s attention removed";
    else if (c.converse) what = c.condition + " hidden from the other positions in the layers below " + layer;
    else what = c.condition + " hidden in layers " + layer + " and up";
    var baseLayer = c.baseline_row ? c.baseline_row.split("@")[1] : null;
    var nothing = c.kind === "mask" ? "nothing hidden" : "no attention removed";
    var marked = c.kind === "mask" ? " Marked: the prompt tokens this row hid." : " Nothing is hidden in an ablation row.";
    showRows(
      panel,
      c.name + ": layer " + layer,
      what + "; " + seedNote(c) + "; the first " + data.n_items + " test items." + marked,
      c.unit,
      c.variant + "@" + layer,
      c.baseline_row,
      nothing + " (layer " + baseLayer + ")",
      nothing
    );
  }

  function headClick(panel, m, layer, head) {
    var what =
      m.kind === "knockout"
        ? m.condition + " hidden from head " + head + " at layer " + layer + " only"
        : m.condition + " hidden from layer " + m.from_layer + " on from every head but head " + head + " at layer " + layer;
    showRows(
      panel,
      m.title + ": layer " + layer + ", head " + head,
      what + "; " + seedNote(m) + "; the first " + data.n_items + " test items. Marked: the prompt tokens hidden.",
      m.unit,
      m.kind + "/h" + head + "@" + layer,
      m.reference_row,
      m.reference,
      m.reference
    );
  }

  // ------------------------------------------------------------------ charts

  function curveTrace(c, i) {
    return {
      x: c.layers,
      y: c.score,
      meta: i,
      name: c.name,
      mode: "lines+markers",
      marker: { size: 8 },
      customdata: c.layers.map(function (_, j) {
        return [c.lo[j], c.hi[j]];
      }),
      error_y: {
        type: "data",
        symmetric: false,
        array: c.score.map(function (s, j) {
          return c.hi[j] === null || s === null ? 0 : c.hi[j] - s;
        }),
        arrayminus: c.score.map(function (s, j) {
          return c.lo[j] === null || s === null ? 0 : s - c.lo[j];
        }),
        thickness: 1,
        width: 3,
      },
      hovertemplate:
        "layer %{x}<br>" + c.metric + " %{y:.2f}<br>95% interval %{customdata[0]:.2f} to %{customdata[1]:.2f}<extra>%{fullData.name}</extra>",
    };
  }

  // One chart's section: its title, the chart, and the (hidden) panel a click fills.
  function groupSection(kind, title, chartClass) {
    var section = el("div", "explore-group " + kind);
    section.dataset.group = title;
    section.appendChild(el("h3", null, title));
    var chart = el("div", chartClass);
    var panel = el("div", "detail");
    panel.hidden = true;
    section.appendChild(chart);
    section.appendChild(panel);
    charts.appendChild(section);
    panels.push(panel);
    return { section: section, chart: chart, panel: panel };
  }

  function curveGroup(title, members) {
    var g = groupSection("curve-group", title, "chart");
    var section = g.section, chart = g.chart, panel = g.panel;
    var drawn = false;
    return function render() {
      var visible = members.filter(function (i) {
        return shown(data.curves[i]);
      });
      section.hidden = visible.length === 0;
      if (!visible.length) return;
      var first = data.curves[visible[0]];
      var shapes = visible
        .map(function (i) {
          return data.curves[i];
        })
        .filter(function (c) {
          return c.recognition !== null && c.recognition < c.layers[c.layers.length - 1];
        })
        .map(function (c) {
          return { type: "line", xref: "x", yref: "paper", x0: c.recognition, x1: c.recognition, y0: 0, y1: 1, line: { dash: "dot", width: 1, color: "#888" } };
        });
      var layout = {
        height: 400,
        margin: { t: 20, r: 20, b: 50, l: 60 },
        hovermode: "closest",
        xaxis: { title: { text: first.kind === "mask" ? "layer j masked from (or below)" : "ablated layer" }, dtick: 1, tickformat: "d" },
        yaxis: { title: { text: first.metric } },
        legend: { orientation: "h", y: -0.2 },
        shapes: shapes,
      };
      Plotly.react(chart, visible.map(function (i) {
        return curveTrace(data.curves[i], i);
      }), layout, config);
      if (!drawn) {
        drawn = true;
        chart.on("plotly_click", function (ev) {
          var p = ev.points[0];
          curveClick(panel, data.curves[p.data.meta], p.x);
        });
      }
    };
  }

  function headGroup(m) {
    var g = groupSection("head-group", m.title, "chart heatmap");
    var section = g.section, chart = g.chart, panel = g.panel;
    var drawn = false;
    return function render() {
      section.hidden = !shown(m);
      if (section.hidden || drawn) return;
      drawn = true;
      var custom = m.lo.map(function (row, i) {
        return row.map(function (lo, j) {
          return [lo, m.hi[i][j]];
        });
      });
      var trace = {
        type: "heatmap",
        z: m.delta,
        x: m.heads.map(String),
        y: m.layers.map(String),
        customdata: custom,
        colorscale: "RdBu",
        reversescale: true,
        zmid: 0,
        colorbar: { title: { text: m.metric + " change vs " + m.reference } },
        hovertemplate: "layer %{y}, head %{x}<br>change %{z:.2f}<br>95% interval %{customdata[0]:.2f} to %{customdata[1]:.2f}<extra></extra>",
      };
      var layout = {
        height: Math.max(300, 40 + 28 * m.layers.length),
        margin: { t: 20, r: 20, b: 50, l: 60 },
        xaxis: { title: { text: "query head" }, type: "category" },
        yaxis: { title: { text: "layer" }, type: "category" },
      };
      Plotly.newPlot(chart, [trace], layout, config);
      chart.on("plotly_click", function (ev) {
        var p = ev.points[0];
        headClick(panel, m, Number(p.y), Number(p.x));
      });
    };
  }

  var renderers = [];

  function build() {
    var groups = {};
    var order = [];
    data.curves.forEach(function (c, i) {
      if (!groups[c.group]) {
        groups[c.group] = [];
        order.push(c.group);
      }
      groups[c.group].push(i);
    });
    order.forEach(function (g) {
      renderers.push(curveGroup(g, groups[g]));
    });
    data.heads.forEach(function (m) {
      renderers.push(headGroup(m));
    });
  }

  function render() {
    panels.forEach(function (p) {
      p.hidden = true;
    });
    renderers.forEach(function (r) {
      r();
    });
    document.getElementById("explore").dataset.ready = "yes";
  }

  fillFilter("task", distinct("task"), "all tasks");
  fillFilter("condition", distinct("condition"), "all conditions");
  fillFilter("seed", distinct("seed"), "all seeds (pooled)");
  build();
  render();
})();
