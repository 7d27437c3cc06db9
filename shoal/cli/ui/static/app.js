// Shoal UI: the service map (Cytoscape.js) and the live flow table.
// Every name from the cluster is untrusted: it reaches the DOM only through textContent
// (never innerHTML) and the map draws labels on a canvas.
"use strict";

const COLORS = { ok: "#2e7d32", plain: "#757575", warn: "#f9a825", denied: "#d32f2f" };
const ERROR_RATE_WARN = 0.05;
const POLL_MS = 1000;

const state = { namespace: "", filter: "", lastSeq: 0, follow: true, cy: null, layoutKey: "" };

function edgeColor(edge) {
  if (edge.verdict === "denied") return COLORS.denied;
  if (edge.error_rate > ERROR_RATE_WARN) return COLORS.warn;
  if (edge.mtls === "all") return COLORS.ok;
  return COLORS.plain;
}

function edgeLabel(edge) {
  const parts = [];
  if (edge.verdict === "denied") parts.push("DENIED");
  parts.push(edge.mtls === "all" ? "mTLS" : edge.mtls === "partial" ? "mTLS partly" : "plaintext");
  if (edge.requests_per_s) parts.push(edge.requests_per_s + " req/s");
  else parts.push(edge.connections_per_s + " conn/s");
  if (edge.error_rate) parts.push(Math.round(edge.error_rate * 100) + "% err");
  return parts.join(" · ");
}

function nodeLabel(node) {
  const kind = node.kind === "service" ? "svc " : "";
  return node.namespace ? kind + node.name + "\n" + node.namespace : kind + node.name;
}

function makeMap() {
  return cytoscape({
    container: document.getElementById("map"),
    wheelSensitivity: 0.3,
    // Large maps: draw cheap while panning, and skip labels too small to read.
    hideEdgesOnViewport: true,
    textureOnViewport: true,
    pixelRatio: 1,
    style: [
      { selector: "node", style: {
          "label": "data(label)", "text-wrap": "wrap", "font-size": 11, "text-valign": "bottom",
          "text-margin-y": 4, "background-color": "#1565c0", "width": 28, "height": 28,
          "min-zoomed-font-size": 6 } },
      { selector: "node[kind = 'service']", style: { "shape": "round-diamond", "background-color": "#6a1b9a" } },
      { selector: "node[kind = 'world']", style: { "shape": "hexagon", "background-color": "#9e9e9e" } },
      { selector: "edge", style: {
          "width": 3, "curve-style": "bezier", "target-arrow-shape": "triangle",
          "line-color": "data(color)", "target-arrow-color": "data(color)",
          "line-style": "data(lineStyle)", "label": "data(label)", "font-size": 9,
          "text-rotation": "autorotate", "text-background-color": "#fff", "text-background-opacity": 0.8,
          "min-zoomed-font-size": 7 } },
      { selector: "edge[?idle]", style: { "opacity": 0.35 } },
    ],
  });
}

function syncMap(snapshot) {
  const cy = state.cy;
  const wanted = new Set();
  let added = false;
  cy.batch(() => {
    for (const node of snapshot.nodes) {
      wanted.add(node.id);
      const data = { id: node.id, kind: node.kind, label: nodeLabel(node), namespace: node.namespace,
                     name: node.name, pods: node.pods, identities: node.identities };
      const existing = cy.getElementById(node.id);
      if (existing.nonempty()) existing.data(data); else { cy.add({ group: "nodes", data }); added = true; }
    }
    for (const edge of snapshot.edges) {
      wanted.add(edge.id);
      const data = Object.assign({}, edge, {
        color: edgeColor(edge), label: edgeLabel(edge), idle: !edge.active,
        lineStyle: edge.mtls === "all" ? "solid" : "dashed" });
      const existing = cy.getElementById(edge.id);
      if (existing.nonempty()) existing.data(data); else { cy.add({ group: "edges", data }); added = true; }
    }
    cy.elements().forEach((element) => { if (!wanted.has(element.id())) { element.remove(); } });
  });
  if (added) {
    cy.layout({ name: "breadthfirst", directed: true, spacingFactor: 1.1, animate: false, fit: true,
                padding: 30 }).run();
  }
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function syncEdgeTable(snapshot) {
  const body = document.querySelector("#edges tbody");
  const names = new Map(snapshot.nodes.map((n) => [n.id,
    (n.kind === "service" ? "svc " : "") + (n.namespace ? n.namespace + "/" : "") + n.name]));
  const rows = document.createDocumentFragment();
  for (const edge of snapshot.edges) {
    const row = document.createElement("tr");
    row.dataset.edge = edge.id;
    cell(row, names.get(edge.source) || edge.source);
    cell(row, names.get(edge.target) || edge.target);
    cell(row, edge.verdict + (edge.drop_reason ? " (" + edge.drop_reason + ")" : ""), edge.verdict);
    cell(row, edge.mtls);
    cell(row, String(edge.connections_per_s));
    cell(row, String(edge.requests_per_s));
    cell(row, Math.round(edge.error_rate * 100) + "%");
    cell(row, edge.identities.join("\n"), "identities");
    cell(row, edge.policies.join(", "));
    rows.appendChild(row);
  }
  body.replaceChildren(rows);
  document.getElementById("window").textContent = String(snapshot.window_s);
}

function syncNamespaces(namespaces) {
  const select = document.getElementById("namespace");
  const have = new Set(Array.from(select.options).map((o) => o.value));
  for (const ns of namespaces) {
    if (!have.has(ns)) {
      const option = document.createElement("option");
      option.value = ns;
      option.textContent = ns;
      select.appendChild(option);
    }
  }
}

function syncStatus(relay) {
  const status = document.getElementById("relay-status");
  status.textContent = relay.connected ? "relay connected · " + relay.flows_seen + " flows"
                                       : "relay unreachable: " + (relay.error || "connecting");
  status.classList.toggle("down", !relay.connected);
}

async function getJSON(url) {
  const response = await fetch(url, { method: "GET", credentials: "same-origin", cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function pollGraph() {
  try {
    const query = state.namespace ? "?namespace=" + encodeURIComponent(state.namespace) : "";
    const snapshot = await getJSON("/api/graph" + query);
    syncMap(snapshot);
    syncEdgeTable(snapshot);
    syncNamespaces(snapshot.namespaces);
    syncStatus(snapshot.relay);
    document.body.dataset.graphUpdated = String(Date.now());
  } catch (error) {
    syncStatus({ connected: false, error: String(error) });
  }
}

const MAX_FLOW_ROWS = 300;

async function pollFlows() {
  if (!state.follow && state.lastSeq) return;
  const error = document.getElementById("filter-error");
  try {
    const params = new URLSearchParams({ after: String(state.lastSeq), limit: "200", filter: state.filter });
    const page = await getJSON("/api/flows?" + params.toString());
    error.textContent = "";
    const body = document.querySelector("#flows tbody");
    for (const flow of page.flows) {
      const row = document.createElement("tr");
      cell(row, flow.time);
      cell(row, flow.node);
      cell(row, flow.source);
      cell(row, flow.destination);
      cell(row, flow.type);
      cell(row, flow.verdict, flow.verdict);
      cell(row, flow.summary + (flow.policies.length ? " [" + flow.policies.join(", ") + "]" : ""));
      body.insertBefore(row, body.firstChild);
    }
    while (body.rows.length > MAX_FLOW_ROWS) body.deleteRow(body.rows.length - 1);
    state.lastSeq = page.last_seq;
  } catch (failure) {
    error.textContent = String(failure.message || failure);
  }
}

function start() {
  state.cy = makeMap();
  window.shoalMap = state.cy;          // for the browser test and the devtools console
  document.getElementById("namespace").addEventListener("change", (event) => {
    state.namespace = event.target.value;
    state.cy.elements().remove();
    pollGraph();
  });
  document.getElementById("filter-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.filter = document.getElementById("filter").value;
    state.lastSeq = 0;
    document.querySelector("#flows tbody").replaceChildren();
    pollFlows();
  });
  document.getElementById("follow").addEventListener("change", (event) => { state.follow = event.target.checked; });
  pollGraph();
  pollFlows();
  setInterval(pollGraph, POLL_MS);
  setInterval(pollFlows, POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
