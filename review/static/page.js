// NEURAL Review page behaviour that needs no server round trip: one zoom / pan shared by every image view,
// the heatmap opacity, keyboard shortcuts, and the time the reader waited (click -> new picture on screen).
(() => {
  if (window.__nrPage) return;
  window.__nrPage = true;
  const V = (window.__nrView = { s: 1, x: 0, y: 0 });
  const apply = () => {
    document.querySelectorAll('.nr-canvas').forEach((c) => {
      c.style.transform = `translate(${V.x}px, ${V.y}px) scale(${V.s})`;
    });
  };
  const reset = () => { V.s = 1; V.x = 0; V.y = 0; apply(); };
  const zoomAt = (stage, px, py, f) => {
    const s = Math.min(16, Math.max(1, V.s * f));
    const k = s / V.s;
    V.x = px - k * (px - V.x); V.y = py - k * (py - V.y); V.s = s;
    if (s === 1) { V.x = 0; V.y = 0; }
    apply();
  };
  document.addEventListener('wheel', (e) => {
    const st = e.target.closest && e.target.closest('.nr-stage');
    if (!st || st.classList.contains('nr-placeholder')) return;
    e.preventDefault();
    const r = st.getBoundingClientRect();
    zoomAt(st, e.clientX - r.left, e.clientY - r.top, Math.exp(-e.deltaY * 0.0015));
  }, { passive: false });
  let drag = null;
  document.addEventListener('pointerdown', (e) => {
    const st = e.target.closest && e.target.closest('.nr-stage');
    if (!st || e.button !== 0 || V.s === 1) return;
    drag = { x: e.clientX, y: e.clientY, vx: V.x, vy: V.y };
    e.preventDefault();
  });
  document.addEventListener('pointermove', (e) => {
    if (!drag) return;
    V.x = drag.vx + e.clientX - drag.x; V.y = drag.vy + e.clientY - drag.y; apply();
  });
  document.addEventListener('pointerup', () => { drag = null; });
  document.addEventListener('dblclick', (e) => { if (e.target.closest && e.target.closest('.nr-stage')) reset(); });

  // the reader's wait: from the click (or slider release) that asked for a new picture to that picture decoded
  const T = (window.__nrTimes = window.__nrTimes || []);
  let pending = null;
  const nonceOf = (kind) => {
    const v = document.querySelector(`.nr-view[data-kind='${kind}']`);
    return v ? v.dataset.nonce : '';
  };
  const arm = (kind, what) => { pending = { kind, what, t0: performance.now(), old: nonceOf(kind) }; };
  document.addEventListener('click', (e) => {
    const t = e.target.closest && e.target.closest(
      '#example-gallery .thumbnail-item, #analyze-btn, #submit-btn, #next-study, #skip-study');
    if (t) arm('attention', t.id === 'submit-btn' ? 'submit and open the next study' : 'open a study');
  }, true);
  const armSlider = (e) => {
    if (e.target.closest && e.target.closest('#keep-slider, #tau-slider')) arm('kept', 'new kept regions');
  };
  document.addEventListener('pointerup', armSlider, true);
  document.addEventListener('keyup', armSlider, true);
  const check = () => {
    apply();
    if (!pending) return;
    const v = document.querySelector(`.nr-view[data-kind='${pending.kind}']`);
    if (!v || !v.dataset.nonce || v.dataset.nonce === pending.old) return;
    const p = pending; pending = null;
    Promise.all([...v.querySelectorAll('img')].map((i) => (i.decode ? i.decode().catch(() => null) : null)))
      .then(() => requestAnimationFrame(() => {
        const ms = performance.now() - p.t0;
        T.push({ kind: p.kind, what: p.what, ms });
        const out = document.querySelector('#nr-wait');
        if (out) out.textContent = `You waited ${(ms / 1000).toFixed(2)} s (${p.what}: click to picture on screen).`;
      }));
  };
  new MutationObserver(check).observe(document.documentElement, { childList: true, subtree: true });

  // keyboard: a / p / d (or 1 / 2 / 3) choose the verdict, n submits and opens the next study, + / - / 0 zoom
  document.addEventListener('keydown', (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const tag = (e.target.tagName || '').toLowerCase();
    if (['input', 'textarea', 'select'].includes(tag) || e.target.isContentEditable) return;
    const verdict = { a: 'agree', 1: 'agree', p: 'partly', 2: 'partly', d: 'disagree', 3: 'disagree' }[e.key];
    if (verdict) {
      const r = document.querySelector(`#verdict input[value='${verdict}']`);
      if (r) { r.click(); e.preventDefault(); }
    } else if (e.key === 'n') {
      const b = document.querySelector('#submit-btn');
      if (b) { b.click(); e.preventDefault(); }
    } else if (e.key === '+' || e.key === '=' || e.key === '-' || e.key === '0') {
      const st = document.querySelector('.nr-stage:not(.nr-placeholder)');
      if (!st) return;
      if (e.key === '0') reset();
      else { const r = st.getBoundingClientRect(); zoomAt(st, r.width / 2, r.height / 2, e.key === '-' ? 1 / 1.25 : 1.25); }
      e.preventDefault();
    }
  });
})();
