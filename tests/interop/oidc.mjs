// OAuth 2.0 authorization server fixture for token-injector interop tests.
//
// Usage: node tests/interop/oidc.mjs DIR
//
// DIR must contain server.pem, server.key (localhost cert + PKCS#8 key) and
// ca.pem (the test CA, which also issued the tls_client_auth client cert).
// Writes DIR/rsa.pem, DIR/ec.pem (PKCS#8), DIR/rsa-pkcs1.pem, DIR/ec-sec1.pem
// (the client keys for private_key_jwt), then prints exactly one line to
// stdout: {"issuer":"https://localhost:PORT","port":PORT}.
// Everything else goes to stderr. Exits when stdin closes or on SIGTERM/SIGINT.
// Optional: OIDC_FIXTURE_NO_RFC8414=1 makes /.well-known/oauth-authorization-server
// answer 404 (only /.well-known/openid-configuration is then served).
// Optional: OIDC_FIXTURE_DPOP_NONCE=1 makes the token endpoint require a
// server-provided nonce in every DPoP proof (RFC 9449 section 8).
//
// See README.md next to this file for the full contract.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as https from 'node:https';
import * as path from 'node:path';

import Provider, { errors } from 'oidc-provider';

// oidc-provider prints its notices with console.info (stdout). stdout is
// reserved for the single ready line, so route all console output to stderr.
// eslint-disable-next-line no-console
console.log = console.info = console.debug = (...args) => console.error(...args);

const API = 'https://api.test';
const API_SCOPE = 'read write';
const ACCESS_TOKEN_TTL = 60;

function fail(message, err) {
  process.stderr.write(`oidc fixture: ${message}${err ? `: ${err.stack || err}` : ''}\n`);
  process.exit(1);
}

const dirArg = process.argv[2];
if (!dirArg) fail('usage: node oidc.mjs DIR');
const dir = path.resolve(process.cwd(), dirArg);

let serverCert;
let serverKey;
let caCert;
try {
  serverCert = fs.readFileSync(path.join(dir, 'server.pem'));
  serverKey = fs.readFileSync(path.join(dir, 'server.key'));
  caCert = fs.readFileSync(path.join(dir, 'ca.pem'));
} catch (err) {
  fail(`cannot read TLS material in ${dir}`, err);
}

// Client keys (private halves are handed to the Rust side through DIR).
const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
// The provider's own access-token signing key.
const providerRsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });

function writeKey(name, pem) {
  fs.writeFileSync(path.join(dir, name), pem, { mode: 0o600 });
}
writeKey('rsa.pem', rsa.privateKey.export({ type: 'pkcs8', format: 'pem' }));
writeKey('ec.pem', ec.privateKey.export({ type: 'pkcs8', format: 'pem' }));
writeKey('rsa-pkcs1.pem', rsa.privateKey.export({ type: 'pkcs1', format: 'pem' }));
writeKey('ec-sec1.pem', ec.privateKey.export({ type: 'sec1', format: 'pem' }));

const rsaPublicJwk = {
  ...rsa.publicKey.export({ format: 'jwk' }), kid: 'rsa-1', alg: 'RS256', use: 'sig',
};
const ecPublicJwk = {
  ...ec.publicKey.export({ format: 'jwk' }), kid: 'ec-1', alg: 'ES256', use: 'sig',
};
const providerJwk = {
  ...providerRsa.privateKey.export({ format: 'jwk' }), kid: 'provider-1', alg: 'RS256', use: 'sig',
};

const common = {
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  scope: 'read write',
};

const baseClients = [
  {
    ...common,
    client_id: 'basic',
    client_secret: 'basic-secret',
    token_endpoint_auth_method: 'client_secret_basic',
  },
  {
    ...common,
    client_id: 'post',
    client_secret: 'p:o+s%t/&x y',
    token_endpoint_auth_method: 'client_secret_post',
  },
  {
    ...common,
    client_id: 'jwt-hs',
    client_secret: 'jwt-hs-secret-that-is-long-enough-for-hs256-0123456789',
    token_endpoint_auth_method: 'client_secret_jwt',
    token_endpoint_auth_signing_alg: 'HS256',
  },
  {
    ...common,
    client_id: 'pkjwt-rsa',
    token_endpoint_auth_method: 'private_key_jwt',
    token_endpoint_auth_signing_alg: 'RS256',
    jwks: { keys: [rsaPublicJwk] },
  },
  {
    ...common,
    client_id: 'pkjwt-ec',
    token_endpoint_auth_method: 'private_key_jwt',
    token_endpoint_auth_signing_alg: 'ES256',
    jwks: { keys: [ecPublicJwk] },
  },
  {
    ...common,
    client_id: 'tls',
    token_endpoint_auth_method: 'tls_client_auth',
    tls_client_auth_san_dns: 'tls-client.test',
  },
];

// The same clients again as `dpop-<id>`, with DPoP-bound access tokens
// (RFC 9449 section 5.2): these must send a DPoP proof with every token
// request, and their tokens carry cnf.jkt. The plain clients may send a proof
// too (then their token is bound as well), but need not.
const clients = [
  ...baseClients,
  ...baseClients.map((client) => ({
    ...client,
    client_id: `dpop-${client.client_id}`,
    dpop_bound_access_tokens: true,
  })),
];

// Parse "DNS:a, DNS:b, IP Address:1.2.3.4" (X509Certificate#subjectAltName).
function sanEntries(cert, type) {
  const san = cert?.subjectAltName;
  if (!san) return [];
  return san.split(/,\s*/)
    .filter((entry) => entry.startsWith(`${type}:`))
    .map((entry) => entry.slice(type.length + 1));
}

function peerCertificate(ctx) {
  const { socket } = ctx;
  if (typeof socket?.getPeerX509Certificate !== 'function') return undefined;
  return socket.getPeerX509Certificate() || undefined;
}

let handler;
const server = https.createServer({
  cert: serverCert,
  key: serverKey,
  ca: caCert,
  requestCert: true,
  rejectUnauthorized: false,
}, (req, res) => {
  if (handler) {
    handler(req, res);
  } else {
    res.statusCode = 503;
    res.end();
  }
});

server.on('tlsClientError', (err) => {
  process.stderr.write(`oidc fixture: TLS client error: ${err.message}\n`);
});

server.once('error', (err) => fail('server error', err));

server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `https://localhost:${port}`;

  const requireDpopNonce = process.env.OIDC_FIXTURE_DPOP_NONCE === '1';

  let provider;
  try {
    provider = new Provider(issuer, {
      clients,
      jwks: { keys: [providerJwk] },
      cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
      scopes: ['openid', 'offline_access', 'read', 'write'],
      clientAuthMethods: [
        'client_secret_basic',
        'client_secret_post',
        'client_secret_jwt',
        'private_key_jwt',
        'tls_client_auth',
      ],
      enabledJWA: {
        // The provider's default is ES256, Ed25519 and EdDSA; the proxy can
        // also sign proofs with RSA keys.
        dPoPSigningAlgValues: ['ES256', 'EdDSA', 'Ed25519', 'PS256', 'RS256'],
      },
      ttl: {
        ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL || ACCESS_TOKEN_TTL,
      },
      features: {
        devInteractions: { enabled: false },
        clientCredentials: { enabled: true },
        dPoP: {
          enabled: true,
          // With a nonce secret the provider hands out a DPoP-Nonce on token
          // responses (also 200s) whenever the proof did not carry the
          // current one; with requireNonce a proof without a valid nonce
          // gets 400 use_dpop_nonce (and a DPoP-Nonce header).
          nonceSecret: crypto.randomBytes(32),
          requireNonce: () => requireDpopNonce,
          allowReplay: false,
        },
        resourceIndicators: {
          enabled: true,
          defaultResource: async (ctx, client, oneOf) => oneOf || API,
          useGrantedResource: async () => true,
          getResourceServerInfo: async (ctx, resourceIndicator) => {
            if (resourceIndicator === API) {
              return {
                scope: API_SCOPE,
                audience: API,
                accessTokenTTL: ACCESS_TOKEN_TTL,
                accessTokenFormat: 'jwt',
                jwt: { sign: { alg: 'RS256' } },
              };
            }
            throw new errors.InvalidTarget();
          },
        },
        mTLS: {
          enabled: true,
          tlsClientAuth: true,
          certificateBoundAccessTokens: false,
          selfSignedTlsClientAuth: false,
          getCertificate(ctx) {
            const cert = peerCertificate(ctx);
            return cert ? cert.toString() : undefined;
          },
          certificateAuthorized(ctx) {
            return ctx.socket?.authorized === true;
          },
          certificateSubjectMatches(ctx, property, expected) {
            const cert = peerCertificate(ctx);
            if (!cert) return false;
            switch (property) {
              case 'tls_client_auth_san_dns':
                return sanEntries(cert, 'DNS').some((name) => name.toLowerCase() === String(expected).toLowerCase());
              case 'tls_client_auth_san_uri':
                return sanEntries(cert, 'URI').includes(expected);
              case 'tls_client_auth_san_email':
                return sanEntries(cert, 'email').includes(expected);
              case 'tls_client_auth_san_ip':
                return sanEntries(cert, 'IP Address').includes(expected);
              default:
                return false;
            }
          },
        },
      },
    });
  } catch (err) {
    fail('cannot construct Provider', err);
  }

  for (const event of ['grant.error', 'server_error', 'jwks.error', 'discovery.error']) {
    provider.on(event, (ctx, err) => {
      const e = err || ctx;
      const detail = [e?.error_description, e?.error_detail].filter(Boolean).join('; ');
      process.stderr.write(`oidc fixture: ${event}: ${e?.message}${detail ? ` (${detail})` : ''}\n`);
    });
  }

  const callback = provider.callback();
  // oidc-provider serves RFC 8414 metadata at /.well-known/oauth-authorization-server
  // as well as /.well-known/openid-configuration. Setting OIDC_FIXTURE_NO_RFC8414=1
  // makes the former answer 404 so that a client's fallback to OpenID discovery can
  // be exercised.
  const hideRfc8414 = process.env.OIDC_FIXTURE_NO_RFC8414 === '1';
  handler = (req, res) => {
    if (hideRfc8414 && (req.url || '').split('?')[0] === '/.well-known/oauth-authorization-server') {
      res.statusCode = 404;
      res.setHeader('content-type', 'application/json');
      res.end('{"error":"not_found"}');
      return;
    }
    callback(req, res);
  };

  process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
});

function shutdown() {
  server.close();
  process.exit(0);
}

process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
process.stdin.on('end', shutdown);
process.stdin.on('close', shutdown);
process.stdin.on('error', shutdown);
process.stdin.resume();
