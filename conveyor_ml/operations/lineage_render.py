"""How `conveyor models | lineage | runs` print: rich tables, JSON, Graphviz DOT, and a self-contained HTML
page with the lineage graph laid out by grandalf (Sugiyama layering) and drawn as inline SVG."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field

from conveyor_ml.base.names import PUSH_TARGETS
from conveyor_ml.operations.records import Evaluation, ModelLineage, ModelVersion, PipelineRun

NODE_STYLE = {  # kind -> (fill, stroke)
    "data": ("#e8f1fb", "#4a7fb5"), "execution": ("#fff4e0", "#c98a1b"), "model": ("#e9f7ec", "#3b8f50"),
    "rejected": ("#fdecea", "#c0392b"), "release": ("#f1ecfb", "#7a5bb5"), "now": ("#dff5f2", "#16887a"),
}


@dataclass
class Graph:
    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (label, kind)
    edges: list[tuple[str, str]] = field(default_factory=list)

    def node(self, node_id: str, label: str, kind: str) -> str:
        self.nodes.setdefault(node_id, (label, kind))
        return node_id

    def edge(self, source: str, target: str) -> None:
        if source in self.nodes and target in self.nodes and (source, target) not in self.edges:
            self.edges.append((source, target))


def _percent(traffic_percent: int | None) -> str:
    """A traffic share, "?%" where the store holds none that can be read."""
    return "?%" if traffic_percent is None else f"{traffic_percent}%"


def lineage_graph(chain: ModelLineage) -> Graph:
    graph = Graph()
    model_kind = "rejected" if chain.state == "rejected" else "model"
    model = graph.node(f"model:{chain.model_id}", f"Model #{chain.model_id}" +
                       (f" (v{chain.version})" if chain.version else "") + f"\n{chain.state}", model_kind)
    training = chain.training
    facts = training.facts if training else {}
    trainer = graph.node("trainer", f"Trainer\n{facts.get('strategy', '?')} x{facts.get('replicas', '?')}, "
                                    f"{facts.get('steps', '?')} steps", "execution")
    graph.edge(trainer, model)
    for base in training.warm_start_from if training else []:
        graph.edge(graph.node(f"model:{base}", f"Model #{base}\n(warm start)", "model"), trainer)
    for data in chain.data:
        examples = graph.node(f"examples:{data.examples_id}", f"Examples\nspan {data.span if data.span is not None else '?'}",
                              "data")
        graph.edge(examples, trainer)
        for statistics in data.statistics:
            node = graph.node(f"statistics:{statistics.id}", "Statistics", "data")
            graph.edge(examples, node)
            for anomalies in data.anomalies:
                anomalies_node = graph.node(f"anomalies:{anomalies.id}", "Anomalies\n(validated)", "data")
                graph.edge(node, anomalies_node)
                graph.edge(anomalies_node, trainer)
    for schema in chain.schema:
        graph.edge(graph.node(f"schema:{schema.id}", "Schema", "data"), trainer)
    gate = model
    evaluation = chain.evaluation
    if evaluation:
        verdict = "blessed" if evaluation.blessed else "NOT blessed"
        accuracy = f"accuracy {evaluation.accuracy:.4f}\n" if evaluation.accuracy is not None else ""
        tested = f"{evidence_text(evaluation)}\n" if evaluation.eval_examples else ""
        evaluator = graph.node("evaluator", f"Evaluator\n{accuracy}{tested}{verdict}", "execution")
        graph.edge(model, evaluator)
        if evaluation.baseline_model_id:
            baseline = graph.node(f"model:{evaluation.baseline_model_id}",
                                  f"Model #{evaluation.baseline_model_id}\n(baseline)", "model")
            graph.edge(baseline, evaluator)
        gate = evaluator
    for position, infra in enumerate(chain.infra_validation):
        node = graph.node(f"infra:{position}", "InfraValidator\n" + ("blessed" if infra.blessed else "NOT blessed"),
                          "execution")
        graph.edge(model, node)
    for quantized in chain.quantized:
        node = graph.node(f"tflite:{quantized.variant}", f"TFLite {quantized.variant}\n"
                          f"{(quantized.size_bytes or 0) / 1024:.1f} KiB" +
                          ("" if quantized.blessed else " (not blessed)"), "model")
        graph.edge(model, node)
    last_by_target = {}
    for push in chain.pushes:
        if push.version is None:
            continue
        node = graph.node(f"push:{push.target}:{push.version}", f"Push {push.target}\nversion {push.version}", "release")
        graph.edge(gate, node)
        for infra in (n for n in graph.nodes if n.startswith("infra:")):
            graph.edge(infra, node)
        last_by_target[push.target] = node
    for release in chain.releases:
        if release.kind in PUSH_TARGETS:
            continue
        target = (release.state[0].target or "local") if release.state else "local"
        mine = ", ".join(f"{s.label or s.release_state} {_percent(s.traffic_percent)}"
                         for s in release.state) \
            or _wrapped(release.reason or "", 48)  # a measurement, verdict or shadow report: what it found
        node = graph.node(f"release:{release.execution_id}",
                          f"{release.kind.split('.')[-1]} {(release.time or '')[:16]}\n{mine}", "release")
        if target in last_by_target:
            graph.edge(last_by_target[target], node)
        last_by_target[target] = node
    for deployed in chain.deployed:
        node = graph.node(f"now:{deployed.target}", f"now: {deployed.target} {deployed.label or ''}\n"
                          f"{_percent(deployed.traffic_percent)} of traffic", "now")
        if deployed.target in last_by_target:
            graph.edge(last_by_target[deployed.target], node)
    return graph


def models_graph(rows: list[ModelVersion], model_name: str) -> Graph:
    graph = Graph()
    for row in rows:
        label = f"Model #{row.model_id}" + (f" v{row.version}" if row.version else "") + \
            f"\n{row.state}" + (f", acc {row.eval_accuracy:.4f}" if row.eval_accuracy else "")
        graph.node(f"model:{row.model_id}", label, "rejected" if row.state == "rejected" else "model")
    for row in rows:
        for deployed in row.deployed:
            node = graph.node(f"now:{deployed.target}:{deployed.label}",
                              f"{model_name} {deployed.target}\n{deployed.label or ''} "
                              f"{_percent(deployed.traffic_percent)}", "now")
            graph.edge(f"model:{row.model_id}", node)
    return graph


def to_dot(graph: Graph, title: str) -> str:
    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = [f"digraph {quoted(title)} {{", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for node_id, (label, kind) in graph.nodes.items():
        fill, stroke = NODE_STYLE[kind]
        lines.append(f"  {quoted(node_id)} [label={quoted(label)}, fillcolor={quoted(fill)}, color={quoted(stroke)}];")
    lines += [f"  {quoted(a)} -> {quoted(b)};" for a, b in graph.edges]
    return "\n".join(lines + ["}"]) + "\n"


def _layout(graph: Graph) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
    """Left-to-right layered layout: node id -> (x, y) centre, and the node sizes."""
    from grandalf.graphs import Edge, Vertex
    from grandalf.graphs import Graph as GGraph
    from grandalf.layouts import SugiyamaLayout

    sizes = {}
    for node_id, (label, _) in graph.nodes.items():
        lines = label.split("\n")
        sizes[node_id] = (max(len(line) for line in lines) * 7.2 + 24, len(lines) * 16 + 14)
    vertices = {node_id: Vertex(node_id) for node_id in graph.nodes}

    class View:
        def __init__(self, w: float, h: float):
            # grandalf lays out top-down; swapping width and height and then the axes gives left-to-right
            self.w, self.h = h, w
            self.xy = (0.0, 0.0)

    for node_id, vertex in vertices.items():
        vertex.view = View(*sizes[node_id])
    layout_graph = GGraph(list(vertices.values()), [Edge(vertices[a], vertices[b]) for a, b in graph.edges])
    positions, offset = {}, 0.0
    for component in layout_graph.C:
        sugiyama = SugiyamaLayout(component)
        sugiyama.xspace, sugiyama.yspace = 24, 60
        sugiyama.init_all()
        sugiyama.draw()
        ys = [v.view.xy[0] for v in component.sV]
        low = min(y - v.view.w / 2 for y, v in zip(ys, component.sV))
        for vertex in component.sV:
            x, y = vertex.view.xy[1], vertex.view.xy[0] - low + offset
            positions[vertex.data] = (x, y)
        offset = max(y + sizes[v.data][1] / 2 for v in component.sV for _, y in [positions[v.data]]) + 30
    left = min(x - sizes[n][0] / 2 for n, (x, _) in positions.items())
    return {n: (x - left + 20, y + 20) for n, (x, y) in positions.items()}, sizes


def to_svg(graph: Graph) -> str:
    if not graph.nodes:
        return "<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'></svg>"
    positions, sizes = _layout(graph)
    width = max(x + sizes[n][0] / 2 for n, (x, _) in positions.items()) + 20
    height = max(y + sizes[n][1] / 2 for n, (_, y) in positions.items()) + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#777"/></marker></defs>']
    for a, b in graph.edges:
        (ax, ay), (bx, by) = positions[a], positions[b]
        x1, x2 = ax + sizes[a][0] / 2, bx - sizes[b][0] / 2
        middle = (x1 + x2) / 2
        parts.append(f'<path class="edge" data-from="{html.escape(a)}" data-to="{html.escape(b)}" '
                     f'd="M{x1:.1f},{ay:.1f} C{middle:.1f},{ay:.1f} {middle:.1f},{by:.1f} {x2:.1f},{by:.1f}" '
                     'fill="none" stroke="#777" stroke-width="1.3" marker-end="url(#arrow)"/>')
    for node_id, (label, kind) in graph.nodes.items():
        (x, y), (w, h) = positions[node_id], sizes[node_id]
        fill, stroke = NODE_STYLE[kind]
        parts.append(f'<g class="node {kind}" data-id="{html.escape(node_id)}">'
                     f'<rect x="{x - w / 2:.1f}" y="{y - h / 2:.1f}" width="{w:.1f}" height="{h:.1f}" rx="8" '
                     f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>')
        lines = label.split("\n")
        for i, line in enumerate(lines):
            weight = ' font-weight="bold"' if i == 0 else ""
            parts.append(f'<text x="{x:.1f}" y="{y - (len(lines) - 1) * 8 + i * 16 + 4:.1f}" text-anchor="middle"'
                         f'{weight}>{html.escape(line)}</text>')
        parts.append("</g>")
    return "\n".join(parts + ["</svg>"])


def to_html(graph: Graph, title: str, document: dict | list) -> str:
    """One file, no external resources: the graph, then the full JSON it was drawn from."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; }} .graph {{ overflow-x: auto; border: 1px solid #ddd; border-radius: 8px; padding: 8px; }}
pre {{ background: #f6f6f6; padding: 12px; border-radius: 8px; overflow-x: auto; font-size: 12px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="graph">{to_svg(graph)}</div>
<details><summary>Lineage record (JSON)</summary><pre>{html.escape(json.dumps(document, indent=2, default=str))}</pre></details>
</body></html>
"""


def evidence_text(row: ModelVersion | Evaluation) -> str:
    """The paired test in a few characters: eval set size, accuracy difference, p-value ('n=250 +0.8pt p=0.84')."""
    if not row.eval_examples:
        return "-"
    parts = [f"n={row.eval_examples}"]
    if row.accuracy_difference is not None:
        parts.append(f"{row.accuracy_difference * 100:+.1f}pt")
    if row.p_value is not None:
        parts.append(f"p={row.p_value:.2g}")
    return " ".join(parts)


def models_table(rows: list[ModelVersion], model_name: str):
    from rich.table import Table

    table = Table(title=f"model versions of {model_name}", title_justify="left")
    for column in ("model", "version", "created", "run", "spans", "accuracy", "vs baseline", "blessed", "quantized",
                   "deployed now", "state"):
        table.add_column(column)
    for row in rows:
        quantized = ", ".join(f"{q.variant} {(q.size_bytes or 0) / 1024:.0f}KiB/{q.accuracy or 0:.3f}"
                              for q in row.quantized)
        deployed = ", ".join(f"{d.target} {d.label or ''} {_percent(d.traffic_percent)}"
                             for d in row.deployed)
        state = row.state + (f" ({row.reason})" if row.reason else "")
        versions = "/".join(filter(None, [row.version, row.vertex_version and f"vertex {row.vertex_version}"]))
        table.add_row(f"#{row.model_id}", versions or "-", row.created or "", row.run_id or "",
                      ",".join(map(str, row.spans)),
                      f"{row.eval_accuracy:.4f}" if row.eval_accuracy is not None else "-",
                      evidence_text(row), {True: "yes", False: "no"}.get(row.blessed, "-"), quantized or "-",
                      deployed or "-", state)
    return table


def _wrapped(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:4])


def lineage_text(chain: ModelLineage) -> list[str]:
    """The chain as indented lines, upstream first."""
    lines = [f"{chain.model} model #{chain.model_id}" + (f" (version {chain.version})" if chain.version else "")
             + f": {chain.state}" + (f" — {chain.reason}" if chain.reason else ""),
             f"  created {chain.created or ''} by run {chain.run_id or '?'}, at {chain.uri or ''}"]
    for data in chain.data:
        anomalies = data.anomalies[0] if data.anomalies else None
        statistics = data.statistics[0] if data.statistics else None
        lines.append(f"  data: span {data.span} (Examples #{data.examples_id}, {data.uri or ''})"
                     f"; statistics #{statistics.id if statistics else '-'}"
                     f"; anomalies #{anomalies.id if anomalies else '-'} "
                     f"{anomalies.blessed if anomalies and anomalies.blessed is not None else ''}")
    for schema in chain.schema:
        lines.append(f"  schema: #{schema.id} {schema.uri}")
    training = chain.training
    if training:
        facts = training.facts
        lines.append(f"  trained: execution #{training.execution_id} at {training.started}: "
                     f"{facts.get('strategy')} x{facts.get('replicas')} replicas, {facts.get('steps')} steps, "
                     f"global batch {facts.get('global_batch_size')}, {facts.get('wall_time_s')} s, "
                     f"{facts.get('examples_per_second')} examples/s, eval accuracy {facts.get('eval_accuracy')}")
        lines.append("    parameters: " + ", ".join(f"{k}={v}" for k, v in sorted(training.parameters.items())))
    evaluation = chain.evaluation
    if evaluation:
        thresholds = evaluation.thresholds
        baseline = f"#{evaluation.baseline_model_id}" if evaluation.baseline_model_id else "none"
        examples = (f" on {evaluation.eval_examples} eval examples of spans {evaluation.eval_spans}"
                    if evaluation.eval_examples else "")
        test = f", {thresholds['test']} test at alpha {thresholds.get('alpha')}" if thresholds.get("test") else ""
        lines.append(f"  evaluated: accuracy {evaluation.accuracy}{examples} (min {thresholds.get('min_accuracy')}, "
                     f"max drop {thresholds.get('max_accuracy_drop')}{test} vs baseline {baseline})"
                     f" -> {'blessed' if evaluation.blessed else 'NOT blessed'}")
        if evaluation.decision and evaluation.reason:  # the Evaluator's own one-line reason, with its test and p-value
            lines.append(f"    evidence: {evaluation.reason.removeprefix('not blessed by the Evaluator: ')}")
    for infra in chain.infra_validation:
        lines.append(f"  infra validation: {'blessed' if infra.blessed else 'NOT blessed'}")
    for quantized in chain.quantized:
        lines.append(f"  quantized: {quantized.variant} {(quantized.size_bytes or 0) / 1024:.1f} KiB, "
                     f"accuracy {quantized.accuracy}, {'blessed' if quantized.blessed else 'not blessed'}")
    for push in chain.pushes:
        if push.version is not None:
            lines.append(f"  pushed: {push.target} version {push.version} at {push.time} "
                         f"by run {push.run_id} -> {push.destination}")
        else:
            lines.append(f"  not pushed ({push.target}): {push.skipped}")
    for release in chain.releases:
        state = ", ".join(f"v{s.version} {s.label or s.release_state} {_percent(s.traffic_percent)}"
                          for s in release.state)
        if not release.state:  # a measurement, a verdict, a shadow report: its summary is the line
            lines.append(f"  {release.kind.split('.')[-1].lower()} at {release.time}: {release.reason}")
            continue
        who = f" by {release.by}" if release.by else ""
        why = f" ({release.reason})" if release.reason else ""
        lines.append(f"  {release.kind.split('.')[-1].lower()} at {release.time}{who}{why}: {state}")
    now = ", ".join(f"{d.target} {d.label} {_percent(d.traffic_percent)}" for d in chain.deployed)
    lines.append("  now: " + (now or "not serving"))
    return lines


def runs_table(rows: list[PipelineRun]):
    from rich.table import Table

    table = Table(title="pipeline runs", title_justify="left")
    for column in ("run", "started", "duration", "status", "ran", "cached", "produced", "drift"):
        table.add_column(column)
    for row in rows:
        drift = ", ".join(f"{d.verdict} ({d.reason or ''})" for d in row.drift)
        table.add_row(row.run_id, row.started or "", f"{row.duration_s or 0} s", row.status,
                      str(len(row.complete)), str(len(row.cached)), ", ".join(row.produced) or "-", drift or "-")
    return table
