// An OAuth 2.0 server nobody in this project wrote (oauth2-mock-server from npm), for
// tests/interop_e2e.rs. It proves the operator speaks standard OAuth 2.0 to a third-party
// implementation, not just to our own fake of GoTo.
//
// oauth2-mock-server accepts any client and any redirect_uri, so this script records what the
// operator sent and prints it, one JSON object per line on stdout, for the Rust test to judge:
//   {"event":"listening","url":"http://127.0.0.1:PORT"}
//   {"event":"authorize","query":{...},"code":"..."}             (the code it redirected with)
//   {"event":"token","headers":{...},"body":{...},"response":{...}}
// The values include test-only credentials and tokens: the test compares them, never prints them.
//
// Usage: node oauth2-mock.mjs [--first-expires-in SECONDS]
//   --first-expires-in  expires_in of the first token response, so that the operator refreshes
//                       within seconds and the refresh grant is exercised too.
// The script exits when its stdin closes, so it never outlives the test that started it.

import { OAuth2Server } from 'oauth2-mock-server';

function emit(record) {
  process.stdout.write(JSON.stringify(record) + '\n');
}

const args = process.argv.slice(2);
let firstExpiresIn;
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--first-expires-in') {
    firstExpiresIn = Number(args[++i]);
    if (!Number.isInteger(firstExpiresIn) || firstExpiresIn <= 0) {
      throw new Error('--first-expires-in needs a positive integer');
    }
  } else {
    throw new Error(`unknown argument ${args[i]}`);
  }
}

const server = new OAuth2Server();
await server.issuer.keys.generate('RS256');

let tokenResponses = 0;

server.service.on('beforeAuthorizeRedirect', (redirect, req) => {
  emit({
    event: 'authorize',
    query: req.query,
    code: redirect.url.searchParams.get('code'),
    redirect: redirect.url.href,
  });
});

server.service.on('beforeResponse', (response, req) => {
  tokenResponses += 1;
  if (tokenResponses === 1 && firstExpiresIn !== undefined && response.statusCode === 200) {
    response.body.expires_in = firstExpiresIn;
  }
  emit({
    event: 'token',
    headers: {
      authorization: req.headers.authorization ?? null,
      accept: req.headers.accept ?? null,
      content_type: req.headers['content-type'] ?? null,
    },
    body: req.body,
    status: response.statusCode,
    response: response.body,
  });
});

await server.start(0, '127.0.0.1');
const { port } = server.address();
emit({ event: 'listening', url: `http://127.0.0.1:${port}` });

const stop = async () => {
  try {
    await server.stop();
  } finally {
    process.exit(0);
  }
};
process.stdin.on('end', stop);
process.stdin.on('error', stop);
process.stdin.resume();
process.on('SIGTERM', stop);
