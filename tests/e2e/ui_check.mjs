// Headless-Chromium check of how Prefect's UI (v1 at /, v2 at /v2) shows our artifacts and runs.
//
//   node tests/e2e/ui_check.mjs BASE_URL SPEC.json OUT_DIR
//
// SPEC.json: {"pages": [{"name", "path", "ready": [texts that must all appear], "images": true|false,
//                        "expect_problems": true for a negative control, which passes only when flagged}]}
// For each page: wait until the texts appear (45 s), then record every data-URI image (loaded?
// naturalWidth, shown width, right edge), every table (columns, its scroll container, how far
// it reaches), the right-hand details panel of artifact pages, and whether the page itself
// scrolls sideways. Writes OUT_DIR/<name>.png and OUT_DIR/results.json. Exit 1 when a page
// never got ready, a page expecting images has none or one failed to load, an image or table
// runs under the details panel or off the page, or a page scrolls sideways.
//
// Needs: chromium (Debian: apt-get install -y chromium; CHROMIUM=path to override) and
// playwright-core (npm install --prefix tests/e2e; it downloads no browser).
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const [base, specPath, outDir = 'ui-check-out'] = process.argv.slice(2);
const spec = JSON.parse(fs.readFileSync(specPath, 'utf8'));
fs.mkdirSync(outDir, { recursive: true });
const t0 = Date.now();
// chromium.launch() refuses --user-data-dir in args: a persistent context takes it as a parameter.
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tourguide-ui-check-'));
const ctx = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  viewport: { width: 1280, height: 900 },
});
const results = { base, launch_ms: Date.now() - t0, pages: [] };

function measure() {
  const vw = document.documentElement.clientWidth;
  const scroller = (el) => {
    let sc = el.parentElement;
    while (sc && !['auto', 'scroll'].includes(getComputedStyle(sc).overflowX)) sc = sc.parentElement;
    return sc;
  };
  // The details panel of an artifact page: the column holding its "Last Updated" label.
  const label = [...document.querySelectorAll('body *')].find((e) => e.childElementCount === 0
    && e.textContent.trim() === 'Last Updated');
  const panelLeft = label ? Math.round(label.getBoundingClientRect().left) : null;
  // The column an element must stay in: its markdown container (v1 article.markdown-renderer,
  // v2 div.prose) when it has one, else the left edge of the details panel, else the viewport.
  const limitOf = (el) => {
    const col = el.closest('.prose, .markdown-renderer');
    return col ? Math.round(col.getBoundingClientRect().right) : (panelLeft ?? vw);
  };
  const imgs = [...document.querySelectorAll('img')].filter((i) => (i.getAttribute('src') || '').startsWith('data:'))
    .map((i) => {
      const r = i.getBoundingClientRect();
      const sc = scroller(i);
      const visibleRight = Math.min(r.right, sc ? sc.getBoundingClientRect().right : vw);
      return { alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
               shownWidth: Math.round(r.width), right: Math.round(r.right), visibleRight: Math.round(visibleRight),
               limit: limitOf(i), overflows: visibleRight > limitOf(i) + 1 };
    });
  // How far a table's content reaches: its own box, or text that spills out of a cell (a long
  // unbreakable hash does, in v2).
  const reach = (t) => {
    let right = t.getBoundingClientRect().right;
    const range = document.createRange();
    for (const cell of t.querySelectorAll('th, td')) {
      range.selectNodeContents(cell);
      right = Math.max(right, range.getBoundingClientRect().right);
    }
    return right;
  };
  const tables = [...document.querySelectorAll('table')].map((t) => {
    const r = t.getBoundingClientRect();
    const sc = scroller(t);
    const visibleRight = Math.min(reach(t), sc ? sc.getBoundingClientRect().right : vw);
    return { cols: t.rows[0] ? t.rows[0].cells.length : 0, rows: t.rows.length, width: Math.round(r.width),
             right: Math.round(r.right), visibleRight: Math.round(visibleRight),
             scrollContainer: sc ? `${sc.tagName.toLowerCase()}.${[...sc.classList].slice(0, 2).join('.')}` : null,
             containerClientWidth: sc ? sc.clientWidth : null, containerScrollWidth: sc ? sc.scrollWidth : null,
             limit: limitOf(t), overflows: visibleRight > limitOf(t) + 1,
             // v1 keeps a wide table inside a box of its own that scrolls sideways: allowed, but counted
             scrollsInBox: !!sc && sc.tagName !== 'MAIN' && sc.scrollWidth > sc.clientWidth + 1 };
  });
  // Fixed-width blocks (```…```): they may scroll inside their own box, never spill past the column.
  const pres = [...document.querySelectorAll('pre')].map((e) => {
    const sc = getComputedStyle(e).overflowX === 'visible' ? scroller(e) : e;
    const r = e.getBoundingClientRect();
    const visibleRight = Math.min(Math.max(r.right, e.scrollWidth + r.left), sc ? sc.getBoundingClientRect().right : vw);
    return { width: Math.round(r.width), scrollWidth: e.scrollWidth, visibleRight: Math.round(visibleRight),
             limit: limitOf(e), overflows: visibleRight > limitOf(e) + 1, scrollsInBox: sc === e && e.scrollWidth > e.clientWidth + 1 };
  });
  return { imgs, tables, pres, panelLeft, viewport: vw, pageScrollWidth: document.documentElement.scrollWidth,
           pageOverflowsX: document.documentElement.scrollWidth > vw + 1 };
}

for (const p of spec.pages) {
  const page = await ctx.newPage();
  const errors = [];
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text().slice(0, 200)); });
  page.on('pageerror', (e) => errors.push(String(e).slice(0, 200)));
  const s = Date.now();
  let ready = true;
  try {
    await page.goto(base + p.path, { waitUntil: 'domcontentloaded', timeout: 45000 });
    await page.waitForFunction(([texts, images]) => texts.every((t) => document.body.innerText.includes(t))
      && (!images || [...document.querySelectorAll('img')].some((i) => (i.src || '').startsWith('data:image/'))),
    [p.ready || [], !!p.images], { timeout: 45000 });
  } catch (e) {
    ready = false;
    errors.push(`not ready: ${String(e).slice(0, 200)}`);
  }
  // Let images decode: wait until each data-URI image is complete (or 5 s).
  await page.waitForFunction(() => [...document.querySelectorAll('img')].every((i) => i.complete), null,
    { timeout: 5000 }).catch(() => {});
  await page.waitForTimeout(300);
  const m = await page.evaluate(measure);
  await page.screenshot({ path: path.join(outDir, `${p.name}.png`), fullPage: true });
  const problems = [];
  if (!ready) problems.push('never showed ' + JSON.stringify(p.ready));
  if (p.images && m.imgs.length === 0) problems.push('no embedded image');
  for (const i of m.imgs) {
    if (!(i.complete && i.naturalWidth > 0)) problems.push(`image ${i.alt} did not load`);
    if (i.overflows) problems.push(`image ${i.alt} reaches ${i.visibleRight}px, past its column (${i.limit}px)`);
  }
  for (const t of m.tables) {
    if (t.overflows) problems.push(`a ${t.cols}-column table reaches ${t.visibleRight}px, past its column (${t.limit}px)`);
  }
  for (const b of m.pres) {
    if (b.overflows) problems.push(`a code block reaches ${b.visibleRight}px, past its column (${b.limit}px)`);
  }
  if (m.pageOverflowsX) problems.push(`the page scrolls sideways (${m.pageScrollWidth} > ${m.viewport})`);
  // A negative control passes when the check flags it.
  const passed = p.expect_problems ? ready && problems.length > 0 : problems.length === 0;
  results.pages.push({ name: p.name, url: base + p.path, ready, ms: Date.now() - s, finalUrl: page.url(), ...m,
                       expectProblems: !!p.expect_problems, problems, passed, errors });
  await page.close();
}
await ctx.close();
fs.rmSync(userDataDir, { recursive: true, force: true });
results.total_ms = Date.now() - t0;
fs.writeFileSync(path.join(outDir, 'results.json'), JSON.stringify(results, null, 2));
const bad = results.pages.filter((p) => !p.passed);
for (const p of results.pages) {
  const imgs = p.imgs.map((i) => `${i.naturalWidth}px`).join(',') || '-';
  console.log(`${p.passed ? 'ok  ' : 'FAIL'} ${p.name.padEnd(16)} ${String(p.ms).padStart(5)} ms  images ${imgs}  ` +
              `tables ${p.tables.map((t) => t.cols).join(',') || '-'} (${p.tables.filter((t) => t.scrollsInBox).length} scroll in ` +
              `their box)  ${p.problems.join('; ')}`);
}
console.log(`browser ${results.total_ms} ms (launch ${results.launch_ms} ms); ${bad.length} page(s) failed`);
process.exit(bad.length ? 1 : 0);
