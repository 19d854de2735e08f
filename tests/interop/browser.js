// A real browser for tests/browser_e2e.rs: the system's headless Chromium driven by
// playwright-core, which never downloads a browser of its own.
//
// The Rust test writes one JSON command per line on stdin and reads one JSON answer per line on
// stdout, so it can check the cluster between browser steps while Chromium keeps its cookies:
//   {"op":"goto","url":"..."}                  -> page info after the navigation
//   {"op":"click","selector":"#allow"}         -> page info after the navigation the click starts
//   {"op":"info"}                              -> page info of the current page (status null)
//   {"op":"viewport","width":390,"height":844} -> {}
//   {"op":"screenshot","path":"...png"}        -> {} (full page)
//   {"op":"reset"}                             -> {} (a fresh context: no cookies)
// Page info: {status, url, title, h1, text, scrollWidth, viewportWidth, viewportMeta}.
// Every answer has "ok"; a failed command answers {"ok":false,"error":"..."} and the script goes on.
// Chromium comes from $GOTO_OAUTH_CHROMIUM or /usr/bin/chromium. The script closes the browser and
// exits when its stdin closes, so it never outlives the test that started it.

'use strict';

const readline = require('node:readline');
const { chromium } = require('playwright-core');

const TIMEOUT_MS = 15000;

function answer(record) {
  process.stdout.write(JSON.stringify(record) + '\n');
}

async function pageInfo(page, response) {
  const info = await page.evaluate(() => {
    const h1 = document.querySelector('h1');
    const meta = document.querySelector('meta[name="viewport"]');
    return {
      title: document.title,
      h1: h1 ? h1.innerText : null,
      text: document.body ? document.body.innerText : '',
      scrollWidth: document.documentElement.scrollWidth,
      viewportWidth: window.innerWidth,
      viewportMeta: meta ? meta.getAttribute('content') : null,
    };
  });
  return { status: response ? response.status() : null, url: page.url(), ...info };
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.GOTO_OAUTH_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    timeout: TIMEOUT_MS,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-dev-shm-usage',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
    ],
  });
  let context;
  let page;
  const fresh = async () => {
    if (context) await context.close();
    context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    context.setDefaultTimeout(TIMEOUT_MS);
    context.setDefaultNavigationTimeout(TIMEOUT_MS);
    page = await context.newPage();
  };
  await fresh();

  const handlers = {
    async goto(cmd) {
      const response = await page.goto(cmd.url, { waitUntil: 'load' });
      return pageInfo(page, response);
    },
    async click(cmd) {
      // The consent form posts, the provider redirects, the operator answers: one navigation
      // whose response is the last one in the redirect chain.
      const [response] = await Promise.all([
        page.waitForNavigation({ waitUntil: 'load' }),
        page.click(cmd.selector),
      ]);
      return pageInfo(page, response);
    },
    async info() {
      return pageInfo(page, null);
    },
    async viewport(cmd) {
      await page.setViewportSize({ width: cmd.width, height: cmd.height });
      return {};
    },
    async screenshot(cmd) {
      await page.screenshot({ path: cmd.path, fullPage: true });
      return {};
    },
    async reset() {
      await fresh();
      return {};
    },
  };

  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  answer({ ok: true, ready: true, version: browser.version() });
  for await (const line of lines) {
    if (!line.trim()) continue;
    try {
      const cmd = JSON.parse(line);
      const handler = handlers[cmd.op];
      if (!handler) throw new Error(`unknown op ${cmd.op}`);
      answer({ ok: true, ...(await handler(cmd)) });
    } catch (error) {
      answer({ ok: false, error: String(error && error.message ? error.message : error) });
    }
  }
  await browser.close();
}

main().then(
  () => process.exit(0),
  (error) => {
    answer({ ok: false, fatal: true, error: String(error && error.stack ? error.stack : error) });
    process.exit(1);
  },
);
