"""How `conveyor models | lineage | runs` print: rich tables, JSON, Graphviz DOT, and a self-contained HTML
page with the lineage graph laid out by grandalf (Sugiyama layering) and drawn as inline SVG."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field

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


def lineage_graph(chain: dict) -> Graph:
    graph = Graph()
    model_kind = "rejected" if chain.get("state") == "rejected" else "model"
    model = graph.node(f"model:{chain['model_id']}", f"Model #{chain['model_id']}" +
                       (f" (v{chain['version']})" if chain.get("version") else "") +
                       f"\n{chain.get('state', '')}", model_kind)
    training = chain.get("training", {})
    facts = training.get("facts", {})
    trainer = graph.node("trainer", f"Trainer\n{facts.get('strategy', '?')} x{facts.get('replicas', '?')}, "
                                    f"{facts.get('steps', '?')} steps", "execution")
    graph.edge(trainer, model)
    for base in training.get("warm_start_from", []):
        graph.edge(graph.node(f"model:{base}", f"Model #{base}\n(warm start)", "model"), trainer)
    for data in chain.get("data", []):
        examples = graph.node(f"examples:{data['examples_id']}", f"Examples\nspan {data.get('span', '?')}", "data")
        graph.edge(examples, trainer)
        for statistics in data.get("statistics", []):
            node = graph.node(f"statistics:{statistics['id']}", "Statistics", "data")
            graph.edge(examples, node)
            for anomalies in data.get("anomalies", []):
                anomalies_node = graph.node(f"anomalies:{anomalies['id']}", "Anomalies\n(validated)", "data")
                graph.edge(node, anomalies_node)
                graph.edge(anomalies_node, trainer)
    for schema in chain.get("schema", []):
        graph.edge(graph.node(f"schema:{schema['id']}", "Schema", "data"), trainer)
    gate = model
    evaluation = chain.get("evaluation", {})
    if evaluation:
        verdict = "blessed" if evaluation.get("blessed") else "NOT blessed"
        accuracy = f"accuracy {evaluation['accuracy']:.4f}\n" if evaluation.get("accuracy") is not None else ""
        tested = f"{evidence_text(evaluation)}\n" if evaluation.get("eval_examples") else ""
        evaluator = graph.node("evaluator", f"Evaluator\n{accuracy}{tested}{verdict}", "execution")
        graph.edge(model, evaluator)
        if evaluation.get("baseline_model_id"):
            baseline = graph.node(f"model:{evaluation['baseline_model_id']}",
                                  f"Model #{evaluation['baseline_model_id']}\n(baseline)", "model")
            graph.edge(baseline, evaluator)
        gate = evaluator
    for position, infra in enumerate(chain.get("infra_validation", [])):
        node = graph.node(f"infra:{position}", "InfraValidator\n" + ("blessed" if infra.get("blessed") else "NOT blessed"),
                          "execution")
        graph.edge(model, node)
    for quantized in chain.get("quantized", []):
        node = graph.node(f"tflite:{quantized['variant']}", f"TFLite {quantized['variant']}\n"
                          f"{quantized.get('size_bytes', 0) / 1024:.1f} KiB" +
                          ("" if quantized.get("blessed") else " (not blessed)"), "model")
        graph.edge(model, node)
    last_by_target = {}
    for push in chain.get("pushes", []):
        if "version" not in push:
            continue
        node = graph.node(f"push:{push['target']}:{push['version']}",
                          f"Push {push['target']}\nversion {push['version']}", "release")
        graph.edge(gate, node)
        for infra in (n for n in graph.nodes if n.startswith("infra:")):
            graph.edge(infra, node)
        last_by_target[push["target"]] = node
    for release in chain.get("releases", []):
        if release["kind"] in ("ServingPusher", "GcpPusher"):
            continue
        target = release["state"][0].get("target", "local") if release.get("state") else "local"
        mine = ", ".join(f"{s.get('label') or s.get('release_state')} {s.get('traffic_percent', 0)}%"
                         for s in release.get("state", []))
        node = graph.node(f"release:{release['execution_id']}",
                          f"{release['kind'].split('.')[-1]} {release.get('time', '')[:16]}\n{mine}", "release")
        if target in last_by_target:
            graph.edge(last_by_target[target], node)
        last_by_target[target] = node
    for deployed in chain.get("deployed", []):
        node = graph.node(f"now:{deployed['target']}", f"now: {deployed['target']} {deployed.get('label', '')}\n"
                          f"{deployed.get('traffic_percent', 0)}% of traffic", "now")
        if deployed["target"] in last_by_target:
            graph.edge(last_by_target[deployed["target"]], node)
    return graph


def models_graph(rows: list[dict], model_name: str) -> Graph:
    graph = Graph()
    for row in rows:
        label = f"Model #{row['model_id']}" + (f" v{row['version']}" if row.get("version") else "") + \
            f"\n{row['state']}" + (f", acc {row['eval_accuracy']:.4f}" if row.get("eval_accuracy") else "")
        graph.node(f"model:{row['model_id']}", label, "rejected" if row["state"] == "rejected" else "model")
    for row in rows:
        for deployed in row.get("deployed", []):
            node = graph.node(f"now:{deployed['target']}:{deployed.get('label')}",
                              f"{model_name} {deployed['target']}\n{deployed.get('label', '')} "
                              f"{deployed.get('traffic_percent', 0)}%", "now")
            graph.edge(f"model:{row['model_id']}", node)
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


def evidence_text(row: dict) -> str:
    """The paired test in a few characters: eval set size, accuracy difference, p-value ('n=250 +0.8pt p=0.84')."""
    if not row.get("eval_examples"):
        return "-"
    parts = [f"n={row['eval_examples']}"]
    if row.get("accuracy_difference") is not None:
        parts.append(f"{row['accuracy_difference'] * 100:+.1f}pt")
    if row.get("p_value") is not None:
        parts.append(f"p={row['p_value']:.2g}")
    return " ".join(parts)


def models_table(rows: list[dict], model_name: str):
    from rich.table import Table

    table = Table(title=f"model versions of {model_name}", title_justify="left")
    for column in ("model", "version", "created", "run", "spans", "accuracy", "vs baseline", "blessed", "quantized",
                   "deployed now", "state"):
        table.add_column(column)
    for row in rows:
        quantized = ", ".join(f"{q['variant']} {q.get('size_bytes', 0) / 1024:.0f}KiB/{q.get('accuracy', 0):.3f}"
                              for q in row.get("quantized", []))
        deployed = ", ".join(f"{d['target']} {d.get('label', '')} {d.get('traffic_percent', 0)}%"
                             for d in row.get("deployed", []))
        state = row["state"] + (f" ({row['reason']})" if row.get("reason") else "")
        versions = "/".join(filter(None, [row.get("version"), row.get("vertex_version") and f"vertex {row['vertex_version']}"]))
        table.add_row(f"#{row['model_id']}", versions or "-", row.get("created", ""), row.get("run_id", ""),
                      ",".join(map(str, row.get("spans", []))),
                      f"{row['eval_accuracy']:.4f}" if row.get("eval_accuracy") is not None else "-",
                      evidence_text(row), {True: "yes", False: "no"}.get(row.get("blessed"), "-"), quantized or "-",
                      deployed or "-", state)
    return table


def lineage_text(chain: dict) -> list[str]:
    """The chain as indented lines, upstream first."""
    lines = [f"{chain['model']} model #{chain['model_id']}" + (f" (version {chain['version']})" if chain.get("version") else "")
             + f": {chain['state']}" + (f" — {chain['reason']}" if chain.get("reason") else ""),
             f"  created {chain.get('created', '')} by run {chain.get('run_id', '?')}, at {chain.get('uri', '')}"]
    for data in chain.get("data", []):
        anomalies = data.get("anomalies") or [{}]
        lines.append(f"  data: span {data.get('span')} (Examples #{data['examples_id']}, {data.get('uri', '')})"
                     f"; statistics #{(data.get('statistics') or [{}])[0].get('id', '-')}"
                     f"; anomalies #{anomalies[0].get('id', '-')} {anomalies[0].get('blessed', '')}")
    for schema in chain.get("schema", []):
        lines.append(f"  schema: #{schema['id']} {schema['uri']}")
    training = chain.get("training", {})
    if training:
        facts = training.get("facts", {})
        lines.append(f"  trained: execution #{training['execution_id']} at {training.get('started')}: "
                     f"{facts.get('strategy')} x{facts.get('replicas')} replicas, {facts.get('steps')} steps, "
                     f"global batch {facts.get('global_batch_size')}, {facts.get('wall_time_s')} s, "
                     f"{facts.get('examples_per_second')} examples/s, eval accuracy {facts.get('eval_accuracy')}")
        parameters = training.get("parameters", {})
        lines.append("    parameters: " + ", ".join(f"{k}={v}" for k, v in sorted(parameters.items())))
    evaluation = chain.get("evaluation", {})
    if evaluation:
        thresholds = evaluation.get("thresholds", {})
        examples = (f" on {evaluation['eval_examples']} eval examples of spans {evaluation.get('eval_spans')}"
                    if evaluation.get("eval_examples") else "")
        test = (f", {thresholds['test']} test at alpha {thresholds.get('alpha')}" if thresholds.get("test") else "")
        lines.append(f"  evaluated: accuracy {evaluation.get('accuracy')}{examples} (min {thresholds.get('min_accuracy')}, "
                     f"max drop {thresholds.get('max_accuracy_drop')}{test} vs baseline "
                     f"{'#' + str(evaluation['baseline_model_id']) if evaluation.get('baseline_model_id') else 'none'})"
                     f" -> {'blessed' if evaluation.get('blessed') else 'NOT blessed'}")
        if evaluation.get("decision"):  # the Evaluator's own one-line reason, with its test and p-value
            lines.append(f"    evidence: {evaluation['reason'].removeprefix('not blessed by the Evaluator: ')}")
    for infra in chain.get("infra_validation", []):
        lines.append(f"  infra validation: {'blessed' if infra.get('blessed') else 'NOT blessed'}")
    for quantized in chain.get("quantized", []):
        lines.append(f"  quantized: {quantized['variant']} {quantized.get('size_bytes', 0) / 1024:.1f} KiB, "
                     f"accuracy {quantized.get('accuracy')}, {'blessed' if quantized.get('blessed') else 'not blessed'}")
    for push in chain.get("pushes", []):
        if "version" in push:
            lines.append(f"  pushed: {push['target']} version {push['version']} at {push.get('time')} "
                         f"by run {push.get('run_id')} -> {push.get('destination')}")
        else:
            lines.append(f"  not pushed ({push['target']}): {push['skipped']}")
    for release in chain.get("releases", []):
        state = ", ".join(f"v{s.get('version')} {s.get('label') or s.get('release_state')} {s.get('traffic_percent', 0)}%"
                          for s in release.get("state", []))
        who = f" by {release['by']}" if release.get("by") else ""
        why = f" ({release['reason']})" if release.get("reason") else ""
        lines.append(f"  {release['kind'].split('.')[-1].lower()} at {release.get('time')}{who}{why}: {state}")
    deployed = chain.get("deployed", [])
    lines.append("  now: " + (", ".join(f"{d['target']} {d.get('label')} {d.get('traffic_percent')}%" for d in deployed)
                              if deployed else "not serving"))
    return lines


def runs_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="pipeline runs", title_justify="left")
    for column in ("run", "started", "duration", "status", "ran", "cached", "produced", "drift"):
        table.add_column(column)
    for row in rows:
        drift = ", ".join(f"{d.get('verdict')} ({d.get('reason', '')})" for d in row.get("drift", []))
        table.add_row(row["run_id"], row.get("started", ""), f"{row.get('duration_s', 0)} s", row["status"],
                      str(len(row.get("complete", []))), str(len(row.get("cached", []))),
                      ", ".join(row.get("produced", [])) or "-", drift or "-")
    return table
