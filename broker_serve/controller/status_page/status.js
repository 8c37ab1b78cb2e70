// The status page: polls the overview every couple of seconds and draws it.
// Everything from the cluster's state goes into text nodes and dataset values, never into
// markup: application names, route prefixes and messages come from users.
"use strict";

const OVERVIEW = "/api/serve/overview/";
const POLL_MS = 2000;
const OK = new Set(["RUNNING", "HEALTHY"]);
const BAD = new Set(["DEPLOY_FAILED", "UNHEALTHY", "FAILED", "DEAD", "NOT_STARTED"]);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "data") Object.assign(node.dataset, value);
    else if (key === "title") node.title = value;
    else if (key === "colSpan") node.colSpan = value;
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function state(value) {
  const kind = OK.has(value) ? "ok" : BAD.has(value) ? "bad" : "busy";
  return el("span", {class: `state ${kind}`}, value);
}

function orDash(value) {
  return value === null || value === undefined || value === "" ? "–" : value;
}

function shortVersion(version) {
  return version ? version.slice(0, 12) : "–";
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "–";
}

function table(headings, rows, empty) {
  if (!rows.length) return el("p", {class: "muted"}, empty);
  return el("table", {},
    el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function cell(className, ...content) {
  return el("td", {class: className}, ...content);
}

function replicaRows(dep) {
  const rows = dep.replicas.map((r) => el("tr", {class: "replica", data: {replica: r.replica_id}},
    cell("mono replica-id", r.replica_id),
    cell("replica-state", state(r.state)),
    cell("replica-node mono", orDash(r.host ? `${r.host} (${r.node})` : r.node)),
    cell("replica-version mono", el("span", {title: orDash(r.version)},
                                    shortVersion(r.version)),
         r.version && r.version !== dep.version ? el("span", {class: "muted"}, " old") : null),
    cell("num replica-ongoing", orDash(r.ongoing_requests)),
    cell("message", r.message)));
  return table(["replica", "state", "node", "version", "ongoing", "message"], rows,
               "no replicas");
}

function autoscaling(dep) {
  if (!dep.autoscaling) return "–";
  return `→ ${dep.autoscaling.target_replicas}: ${dep.autoscaling.last_decision || "no change"}`;
}

function deploymentRows(app) {
  return app.deployments.flatMap((dep) => {
    const running = dep.replicas.filter((r) => r.state === "RUNNING").length;
    return [
      el("tr", {class: "deployment", data: {deployment: dep.name}},
        cell("deployment-name", dep.name, dep.name === app.ingress
          ? el("span", {class: "muted"}, " ingress") : null),
        cell("deployment-status", state(dep.status)),
        cell("num replica-count", `${running}/${dep.target_replicas}`),
        cell("num queue-depth", orDash(dep.queue_depth)),
        cell("num ongoing", orDash(dep.ongoing_requests)),
        cell("num pending-jobs", dep.pending_jobs),
        cell("autoscaling", autoscaling(dep)),
        cell("deployment-version mono", el("span", {title: orDash(dep.version)},
                                           shortVersion(dep.version))),
        cell("message", dep.message)),
      el("tr", {class: "replicas"}, el("td", {colSpan: 9}, replicaRows(dep))),
    ];
  });
}

function applications(view) {
  if (!view.applications.length) return el("p", {class: "muted"}, "no applications");
  return view.applications.map((app) => el("div", {class: "card app", data: {app: app.name}},
    el("h3", {},
      el("span", {class: "app-name"}, app.name), state(app.status),
      el("code", {class: "route-prefix"}, orDash(app.route_prefix)),
      el("span", {class: "muted"}, `${app.source} · deployed ${when(app.last_deployed_time_s)}`
        + ` · version ${shortVersion(app.version)}`)),
    app.message ? el("p", {class: "message app-message"}, app.message) : null,
    table(["deployment", "status", "replicas", "queued", "ongoing", "jobs", "autoscaler",
           "version", "message"], deploymentRows(app), "no deployments")));
}

function target(route) {
  if (route.split.length) {
    return route.split.map((t) => `${t.app} ${Math.round(t.weight * 100)}%`).join(", ")
      + route.shadow.map((t) => `, shadow ${t.app} ${Math.round(t.fraction * 100)}%`).join("");
  }
  return `${route.app} / ${route.deployment}`;
}

function routes(view) {
  return table(["prefix", "target", "methods", "status", "ready"],
    view.routes.routes.map((route) => el("tr", {class: "route", data: {prefix: route.prefix}},
      cell("prefix mono", route.prefix),
      cell("route-target", target(route)),
      cell("methods", route.methods ? route.methods.join(", ") : "any"),
      cell("route-status", state(route.status)),
      cell("route-ready", route.ready ? "yes" : "no"))),
    "no routes");
}

function proxies(view) {
  return table(["proxy", "address", "health", "routes"],
    view.proxies.map((p) => el("tr", {class: "proxy", data: {proxy: p.proxy_id}},
      cell("mono proxy-id", p.proxy_id),
      cell("mono proxy-address", p.address),
      cell("proxy-health", state(p.healthy ? "HEALTHY" : "UNHEALTHY")),
      cell("proxy-routes", `v${orDash(p.routes_version)}`,
           p.routes_current ? "" : el("span", {class: "muted"}, " (behind)")))),
    "no proxies");
}

function nodes(view) {
  return table(["node", "host", "health", "replicas", "offers"],
    view.nodes.map((n) => el("tr", {class: "node", data: {node: n.node_id}},
      cell("mono node-id", n.node_id),
      cell("node-host", orDash(n.host)),
      cell("node-health", state(n.alive ? "HEALTHY" : "UNHEALTHY")),
      cell("num node-replicas", n.replicas),
      cell("mono", Object.entries(n.resources).map(([k, v]) => `${k} ${v}`).join(", ")))),
    "no worker nodes");
}

function failures(view) {
  return table(["when", "what", "application", "replica", "node", "message"],
    view.failures.map((f) => el("tr", {class: "failure"},
      cell("", when(f.time)),
      cell("failure-kind", f.kind),
      cell("", f.app ? `${f.app} / ${f.deployment}` : "–"),
      cell("mono", orDash(f.replica)),
      cell("mono", orDash(f.node)),
      cell("message", f.message))),
    "none recorded");
}

function show(id, content) {
  document.getElementById(id).replaceChildren(...[content].flat());
}

function render(view) {
  show("applications", applications(view));
  show("routes", routes(view));
  show("routes-version", `v${view.routes.version}`);
  show("proxies", proxies(view));
  show("nodes", nodes(view));
  show("failures", failures(view));
  show("leader", view.controller ? `leader ${view.controller}` : "no leader");
  document.getElementById("logout").hidden = view.public;
  const connection = document.getElementById("connection");
  connection.className = "connection live";
  connection.textContent = `updated ${new Date(view.time * 1000).toLocaleTimeString()}`;
  // How many views were drawn: what a test waits on.
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function lost(why) {
  const connection = document.getElementById("connection");
  connection.className = "connection lost";
  connection.textContent = why;
}

async function poll() {
  try {
    const answer = await fetch(OVERVIEW, {credentials: "same-origin", cache: "no-store"});
    if (answer.status === 401) {  // signed out elsewhere, or the token changed
      window.location.reload();
      return;
    }
    if (!answer.ok) lost(`the controller answered ${answer.status}`);
    else render(await answer.json());
  } catch (error) {
    lost(`cannot reach the controller (${error.message})`);
  }
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", poll);
