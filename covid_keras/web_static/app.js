"use strict";
// The page's only script: sends the chosen files to api/predict (XMLHttpRequest, for the
// upload's progress) and shows the answer; signs out (POST logout). Every value is put in
// with textContent.
(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("upload"), box = $("progress-box"), bar = $("progress"), status = $("status");
  let downloadUrl = null;

  function show(el, on) { el.hidden = !on; }
  function fail(message) {
    $("error").textContent = message;
    show($("error"), true);
    show(box, false);
    $("analyse").disabled = false;
  }
  function text(tag, value, cls) {
    const el = document.createElement(tag);
    el.textContent = value;
    if (cls) el.className = cls;
    return el;
  }
  function pct(v) { return (100 * v).toFixed(1) + " %"; }

  function render(body) {
    const p = body.prediction, pat = p.patient;
    $("decision").textContent = pat.decision;
    $("rule").textContent = pat.method === "threshold"
      ? "(" + pat.rule + " rule: " + pat.positive_class + " when its score \u2265 " +
        pat.threshold.toFixed(4) + "; score " + pat.score.toFixed(4) +
        (pat.rule === "any" && pat.normal_class
          ? "; " + pat.normal_class + " only when every slice is" : "") + ")"
      : "(the most probable class: no threshold)";
    const tbody = $("probabilities").querySelector("tbody");
    tbody.replaceChildren();
    for (const [cls, v] of Object.entries(pat.probabilities)) {
      const tr = document.createElement("tr");
      tr.append(text("td", cls), text("td", pct(v)));
      const td = document.createElement("td"), b = document.createElement("span");
      b.className = "bar";
      b.style.width = Math.round(200 * v) + "px";
      td.append(b);
      tr.append(td);
      tbody.append(tr);
    }
    const s = p.series;
    $("series").textContent = "Study " + p.study + ": " + s.used + " slices used of " +
      s.slices_in_series + " (" + s.kind + "; " + s.why + ").";
    const ul = $("warnings");
    ul.replaceChildren();
    if (!p.warnings.length) ul.append(text("li", "none"));
    for (const w of p.warnings) ul.append(text("li", w.reason + (w.detail ? ": " + w.detail : "")));
    const ev = $("evidence");
    ev.replaceChildren();
    p.top_slices.forEach((i, rank) => {
      const sl = p.slices[i];
      if (!sl.evidence || !body.evidence[sl.evidence]) return;
      const fig = document.createElement("figure"), img = document.createElement("img");
      img.src = body.evidence[sl.evidence];
      img.alt = "slice " + sl.index + " with boxes and Grad-CAM";
      img.className = "evidence-img";
      fig.append(img, text("figcaption", "#" + (rank + 1) + ": slice " + sl.index + " of the series, " +
        pat.decision + " " + pct(sl.probabilities[pat.decision]) + ", lung " + pct(sl.lung_fraction)));
      ev.append(fig);
    });
    if (downloadUrl) URL.revokeObjectURL(downloadUrl);
    downloadUrl = URL.createObjectURL(new Blob([body.prediction_json], { type: "application/json" }));
    $("download").href = downloadUrl;
    show($("result"), true);
    // the model server moved to another version: the card names the one that answered
    // (server-rendered HTML, every value escaped there)
    if (body.card_html) $("card").innerHTML = body.card_html;
  }

  // with --auth_token_file: sign out (POST logout clears the cookie), then the login form
  const logout = $("logout");
  if (logout) {
    logout.addEventListener("click", () => {
      logout.disabled = true;
      fetch("logout", { method: "POST", credentials: "same-origin" })
        .then(() => { window.location.assign("login"); })
        .catch(() => { logout.disabled = false; fail("The server could not be reached."); });
    });
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const chosen = [...$("files").files, ...$("folder").files];
    show($("error"), false);
    if (!chosen.length) { fail("Choose a zip, the study's files or a folder first."); return; }
    const data = new FormData();
    for (const f of chosen) data.append("files", f, f.webkitRelativePath || f.name);
    show($("result"), false);
    show(box, true);
    bar.value = 0;
    status.textContent = "Uploading\u2026";
    $("analyse").disabled = true;
    const started = Date.now();
    let timer = null;
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "api/predict");
    xhr.responseType = "json";
    xhr.upload.onprogress = (ev) => {
      if (ev.lengthComputable) {
        bar.value = Math.round(100 * ev.loaded / ev.total);
        status.textContent = "Uploading\u2026 " + bar.value + " %";
      }
    };
    xhr.upload.onload = () => {
      bar.removeAttribute("value"); // indeterminate while the study is analysed
      timer = setInterval(() => {
        status.textContent = "Analysing the study\u2026 " + Math.round((Date.now() - started) / 1000) + " s";
      }, 500);
      status.textContent = "Analysing the study\u2026";
    };
    xhr.onloadend = () => { if (timer) clearInterval(timer); };
    xhr.onerror = () => fail("The server could not be reached.");
    xhr.onload = () => {
      const body = xhr.response;
      if (xhr.status === 200 && body && body.prediction) {
        show(box, false);
        $("analyse").disabled = false;
        render(body);
        status.textContent = "Done in " + body.elapsed_s.toFixed(1) + " s.";
      } else {
        fail("Refused (" + ((body && body.reason) || ("HTTP " + xhr.status)) + "): " +
             ((body && body.error) || "no answer"));
      }
    };
    xhr.send(data);
  });
})();
