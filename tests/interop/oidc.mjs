// OAuth 2.0 authorization server fixture for token-injector interop tests.
//
// Usage: node tests/interop/oidc.mjs DIR
//
// DIR must contain server.pem, server.key (localhost cert + PKCS#8 key) and
// ca.pem (the test CA, which also issued the tls_client_auth client cert).
// Writes DIR/rsa.pem, DIR/ec.pem (PKCS#8), DIR/rsa-pkcs1.pem, DIR/ec-sec1.pem
// (the client keys for private_key_jwt), DIR/bearer-rsa.pem, DIR/bearer-ec.pem
// (keys that sign JWT bearer grant assertions) and DIR/subject-ec.pem (an
// "external" issuer's key, for token exchange subject/actor JWTs), then prints
// exactly one line to stdout: {"issuer":"https://localhost:PORT","port":PORT}.
// Everything else goes to stderr. Exits when stdin closes or on SIGTERM/SIGINT.
// Optional: OIDC_FIXTURE_NO_RFC8414=1 makes /.well-known/oauth-authorization-server
// answer 404 (only /.well-known/openid-configuration is then served).
// Optional: OIDC_FIXTURE_DPOP_NONCE=1 makes the token endpoint require a
// server-provided nonce in every DPoP proof (RFC 9449 section 8).
// Optional: OIDC_FIXTURE_SHORT_TTL=N sets the lifetime of the `short`
// client's tokens (default 3 seconds).
//
// Besides client_credentials, the token endpoint serves two extension grants
// registered here: the JWT bearer grant (RFC 7523 section 2.1) and token
// exchange (RFC 8693).
//
// See README.md next to this file for the full contract.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as https from 'node:https';
import * as path from 'node:path';

import * as jose from 'jose';
import Provider, { errors } from 'oidc-provider';
// Not part of oidc-provider's documented API, but the package has no
// "exports" map and the version is pinned by package-lock.json: the same
// helpers the built-in client_credentials grant uses (resource indicators,
// client scope, DPoP proof validation and binding).
import * as grantHelpers from 'oidc-provider/lib/helpers/grants.js';
import { applyDpopBinding } from 'oidc-provider/lib/helpers/grant_common.js';

// oidc-provider prints its notices with console.info (stdout). stdout is
// reserved for the single ready line, so route all console output to stderr.
// eslint-disable-next-line no-console
console.log = console.info = console.debug = (...args) => console.error(...args);

const API = 'https://api.test';
const API_SCOPE = 'read write';
const ACCESS_TOKEN_TTL = 60;
const SHORT_TTL = Number(process.env.OIDC_FIXTURE_SHORT_TTL || 3);

const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const TT_ACCESS_TOKEN = 'urn:ietf:params:oauth:token-type:access_token';
const TT_JWT = 'urn:ietf:params:oauth:token-type:jwt';
// The `iss` of JWT bearer assertions signed with bearer-rsa.pem/bearer-ec.pem
// (an authenticated client may also use its own client_id).
const BEARER_ISSUER = 'bearer-issuer';
// The `iss` of "external" subject/actor JWTs signed with subject-ec.pem.
const SUBJECT_ISSUER = 'subject-issuer';
const MAX_ASSERTION_LIFETIME = 3600;
// Clock skew allowed for iat/nbf in the future.
const SKEW = 60;
// Audiences a token exchange may ask for (RFC 8693 `audience`).
const EXCHANGE_AUDIENCES = new Set([API, 'https://other-api.test', 'logical-audience']);
// The client a token request without any client identification is served
// as (only for the two extension grants).
const ANONYMOUS = 'anonymous';

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
// Keys of the JWT bearer assertion issuer, and of the "external" issuer of
// token exchange subject/actor JWTs (think Kubernetes ServiceAccount tokens).
const bearerRsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const bearerEc = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
const subjectEc = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });

function writeKey(name, pem) {
  fs.writeFileSync(path.join(dir, name), pem, { mode: 0o600 });
}
writeKey('rsa.pem', rsa.privateKey.export({ type: 'pkcs8', format: 'pem' }));
writeKey('ec.pem', ec.privateKey.export({ type: 'pkcs8', format: 'pem' }));
writeKey('rsa-pkcs1.pem', rsa.privateKey.export({ type: 'pkcs1', format: 'pem' }));
writeKey('ec-sec1.pem', ec.privateKey.export({ type: 'sec1', format: 'pem' }));
writeKey('bearer-rsa.pem', bearerRsa.privateKey.export({ type: 'pkcs8', format: 'pem' }));
writeKey('bearer-ec.pem', bearerEc.privateKey.export({ type: 'pkcs8', format: 'pem' }));
writeKey('subject-ec.pem', subjectEc.privateKey.export({ type: 'pkcs8', format: 'pem' }));

// Verification keys: kid -> { key, algs }.
const bearerKeys = new Map([
  ['bearer-rsa-1', { key: bearerRsa.publicKey, algs: ['RS256', 'PS256'] }],
  ['bearer-ec-1', { key: bearerEc.publicKey, algs: ['ES256'] }],
]);
const subjectKeys = new Map([
  ['subject-ec-1', { key: subjectEc.publicKey, algs: ['ES256'] }],
]);

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

// Clients of the extension grants (RFC 7523, RFC 8693). `none` clients send
// only client_id in the body. bearer-*/exchange-* may use their grant only.
const grantClient = (clientId, grant, auth) => ({
  ...common,
  grant_types: [grant],
  client_id: clientId,
  ...auth,
});
baseClients.push(
  grantClient('bearer-none', JWT_BEARER, { token_endpoint_auth_method: 'none' }),
  grantClient('bearer-basic', JWT_BEARER, {
    client_secret: 'bearer-basic-secret',
    token_endpoint_auth_method: 'client_secret_basic',
  }),
  grantClient('bearer-tls', JWT_BEARER, {
    token_endpoint_auth_method: 'tls_client_auth',
    tls_client_auth_san_dns: 'tls-client.test',
  }),
  grantClient('exchange-none', TOKEN_EXCHANGE, { token_endpoint_auth_method: 'none' }),
  grantClient('exchange-basic', TOKEN_EXCHANGE, {
    client_secret: 'exchange-basic-secret',
    token_endpoint_auth_method: 'client_secret_basic',
  }),
  grantClient('exchange-tls', TOKEN_EXCHANGE, {
    token_endpoint_auth_method: 'tls_client_auth',
    tls_client_auth_san_dns: 'tls-client.test',
  }),
);

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
  // client_credentials with SHORT_TTL-second tokens (for renewal tests).
  {
    ...common,
    client_id: 'short',
    client_secret: 'short-secret',
    token_endpoint_auth_method: 'client_secret_basic',
  },
  // Serves extension grant requests that identify no client at all (oidc-provider
  // itself always needs a client_id: see `rewriteAnonymous` below).
  {
    ...common,
    grant_types: [JWT_BEARER, TOKEN_EXCHANGE],
    client_id: ANONYMOUS,
    token_endpoint_auth_method: 'none',
  },
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

// ---------------------------------------------------------------------------
// Extension grants: JWT bearer (RFC 7523 section 2.1) and token exchange
// (RFC 8693). Both issue the same kind of access token as client_credentials
// (an RS256 at+jwt for https://api.test, DPoP-bound when a proof is sent), with
// `sub` taken from the assertion / subject token.

// Extra claims for an issued token's JWT (see formats.customizers.jwt).
const extraClaims = new WeakMap();
// Requests whose client_id was added by rewriteAnonymous.
const anonymousRequests = new WeakSet();

const customError = (error, description) => new errors.CustomOIDCProviderError(error, description);
const invalidGrant = (description) => customError('invalid_grant', description);
const invalidRequest = (description) => customError('invalid_request', description);
const invalidTarget = (description) => customError('invalid_target', description);

const now = () => Math.floor(Date.now() / 1000);
const asList = (value) => (value === undefined ? [] : [].concat(value));
const quote = (value) => JSON.stringify(value);

// Verifies a compact JWS against `keys` (kid -> { key, algs }); returns
// { header, claims }. Every failure is an invalid_grant naming `label`.
async function verifySigned(label, jwt, keys) {
  let header;
  try {
    header = jose.decodeProtectedHeader(jwt);
  } catch {
    throw invalidGrant(`${label}: not a JWT`);
  }
  if (typeof jwt !== 'string' || jwt.split('.').length !== 3) {
    throw invalidGrant(`${label}: not a signed JWT (JWS compact serialization)`);
  }
  const { alg, kid } = header;
  const allAlgs = new Set([...keys.values()].flatMap((k) => k.algs));
  if (!allAlgs.has(alg)) {
    throw invalidGrant(`${label}: alg ${quote(alg)} is not accepted (expected one of ${[...allAlgs].join(', ')})`);
  }
  let candidates;
  if (kid !== undefined) {
    const known = keys.get(kid);
    if (!known) throw invalidGrant(`${label}: unknown kid ${quote(kid)}`);
    if (!known.algs.includes(alg)) {
      throw invalidGrant(`${label}: alg ${alg} does not fit key ${quote(kid)} (${known.algs.join(', ')})`);
    }
    candidates = [known];
  } else {
    candidates = [...keys.values()].filter((k) => k.algs.includes(alg));
  }
  let payload;
  for (const { key } of candidates) {
    try {
      // eslint-disable-next-line no-await-in-loop
      ({ payload } = await jose.compactVerify(jwt, key, { algorithms: [alg] }));
      break;
    } catch {
      // next key
    }
  }
  if (!payload) throw invalidGrant(`${label}: signature verification failed`);
  let claims;
  try {
    claims = JSON.parse(new TextDecoder().decode(payload));
  } catch {
    throw invalidGrant(`${label}: the payload is not a JSON object`);
  }
  if (!claims || typeof claims !== 'object' || Array.isArray(claims)) {
    throw invalidGrant(`${label}: the payload is not a JSON object`);
  }
  return { header, claims };
}

// exp (required, in the future) and nbf/iat (optional, not in the future).
function checkTimes(label, claims, { iatRequired = false } = {}) {
  const t = now();
  if (typeof claims.exp !== 'number') throw invalidGrant(`${label}: exp is missing or not a number`);
  if (claims.exp <= t) throw invalidGrant(`${label}: expired (exp ${claims.exp} <= now ${t})`);
  if (claims.iat === undefined && iatRequired) throw invalidGrant(`${label}: iat is missing`);
  if (claims.iat !== undefined) {
    if (typeof claims.iat !== 'number') throw invalidGrant(`${label}: iat is not a number`);
    if (claims.iat > t + SKEW) throw invalidGrant(`${label}: iat ${claims.iat} is in the future`);
  }
  if (claims.nbf !== undefined) {
    if (typeof claims.nbf !== 'number') throw invalidGrant(`${label}: nbf is not a number`);
    if (claims.nbf > t + SKEW) throw invalidGrant(`${label}: not valid yet (nbf ${claims.nbf})`);
  }
}

function checkAudience(label, claims, accepted) {
  const aud = asList(claims.aud);
  if (!aud.length) throw invalidGrant(`${label}: aud is missing`);
  if (!aud.some((a) => accepted.includes(a))) {
    throw invalidGrant(`${label}: aud ${quote(claims.aud)} is not accepted (expected ${accepted.map(quote).join(' or ')})`);
  }
}

function checkSubject(label, claims) {
  if (typeof claims.sub !== 'string' || !claims.sub) throw invalidGrant(`${label}: sub is missing`);
}

function registerGrants(provider, issuer, providerPublicKey) {
  const tokenEndpoint = `${issuer}/token`;
  const helpers = Object.fromEntries(
    Object.entries(grantHelpers).map(([name, helper]) => [name, helper.bind(undefined, provider)]),
  );
  const providerKeys = new Map([['provider-1', { key: providerPublicKey, algs: ['RS256'] }]]);
  // RFC 7523 jti replay cache: "iss\0jti" -> exp.
  const seenJti = new Map();

  // A token this provider issued (subject_token_type access_token).
  async function verifyOwnAccessToken(label, jwt) {
    const { header, claims } = await verifySigned(label, jwt, providerKeys);
    if (header.typ !== 'at+jwt') throw invalidGrant(`${label}: typ ${quote(header.typ)} is not at+jwt`);
    if (claims.iss !== issuer) throw invalidGrant(`${label}: iss ${quote(claims.iss)} is not this server`);
    checkTimes(label, claims);
    checkSubject(label, claims);
    return claims;
  }

  // A JWT of the "external" issuer (subject_token_type jwt).
  async function verifyExternalJwt(label, jwt) {
    const { claims } = await verifySigned(label, jwt, subjectKeys);
    if (claims.iss !== SUBJECT_ISSUER) {
      throw invalidGrant(`${label}: iss ${quote(claims.iss)} is not accepted (expected ${quote(SUBJECT_ISSUER)})`);
    }
    checkSubject(label, claims);
    checkAudience(label, claims, [issuer, tokenEndpoint]);
    checkTimes(label, claims);
    return claims;
  }

  // `label` is subject_token or actor_token; errors say which kind was expected.
  async function verifyPresented(label, jwt, type) {
    return type === TT_ACCESS_TOKEN
      ? verifyOwnAccessToken(`${label} (type access_token: an access token of this server)`, jwt)
      : verifyExternalJwt(`${label} (type jwt: a JWT of ${quote(SUBJECT_ISSUER)})`, jwt);
  }

  // Resource, scope, DPoP: as the built-in client_credentials grant does.
  // Returns the saved token, its value and the token_type to answer.
  async function issue(ctx, {
    sub, scopes, gty, claims, audiences = [],
  }) {
    const { client } = ctx.oidc;
    const dPoP = await helpers.validateDpop(ctx);
    const explicitResource = ctx.oidc.params.resource !== undefined;
    const resourceServers = await helpers.resolveRequestedResources(ctx);
    if (resourceServers.length !== 1) {
      throw invalidTarget('exactly one resource indicator value is supported for this grant type');
    }
    const [resourceServer] = resourceServers;
    const granted = [...helpers.validateClientScope(ctx, scopes)]
      .filter(Set.prototype.has.bind(new Set(resourceServer.scope.split(' '))));
    const token = new provider.AccessToken({
      client,
      accountId: sub,
      gty,
      expiresIn: ACCESS_TOKEN_TTL,
    });
    token.resourceServer = resourceServer;
    token.scope = granted.join(' ') || undefined;
    await applyDpopBinding(provider, ctx, dPoP, token);
    helpers.checkDpopRequired(ctx, dPoP);
    const extra = { ...claims };
    if (audiences.length) {
      const aud = [...audiences];
      if (explicitResource) aud.push(...asList(token.aud));
      const unique = [...new Set(aud)];
      extra.aud = unique.length === 1 ? unique[0] : unique;
    }
    extraClaims.set(token, extra);
    const value = await token.save();
    return { token, value };
  }

  // RFC 7523 section 2.1 / 3.
  async function jwtBearer(ctx) {
    const { params, client } = ctx.oidc;
    if (!params.assertion) throw invalidRequest('missing required parameter \'assertion\'');
    const label = 'assertion';
    const { claims } = await verifySigned(label, params.assertion, bearerKeys);
    const acceptedIssuers = [BEARER_ISSUER];
    if (!anonymousRequests.has(ctx.req)) acceptedIssuers.push(client.clientId);
    if (!acceptedIssuers.includes(claims.iss)) {
      throw invalidGrant(`${label}: iss ${quote(claims.iss)} is not accepted (expected ${acceptedIssuers.map(quote).join(' or ')})`);
    }
    checkSubject(label, claims);
    checkAudience(label, claims, [tokenEndpoint, issuer]);
    checkTimes(label, claims, { iatRequired: true });
    if (claims.exp - claims.iat > MAX_ASSERTION_LIFETIME) {
      throw invalidGrant(`${label}: lifetime exp - iat = ${claims.exp - claims.iat} s exceeds ${MAX_ASSERTION_LIFETIME} s`);
    }
    if (typeof claims.jti !== 'string' || !claims.jti) throw invalidGrant(`${label}: jti is missing`);
    const t = now();
    for (const [k, exp] of seenJti) if (exp <= t) seenJti.delete(k);
    const replayKey = `${claims.iss}\0${claims.jti}`;
    if (seenJti.has(replayKey)) throw invalidGrant(`${label}: jti ${quote(claims.jti)} was already used`);
    seenJti.set(replayKey, claims.exp);

    let scope = params.scope;
    if (scope === undefined && typeof claims.scope === 'string') scope = claims.scope;
    if (scope === undefined) scope = API_SCOPE;
    const { token, value } = await issue(ctx, {
      sub: claims.sub,
      scopes: scope.split(' ').filter(Boolean),
      gty: 'jwt_bearer',
      claims: { assertion_iss: claims.iss },
    });
    ctx.body = {
      access_token: value,
      token_type: token.tokenType,
      expires_in: token.expiration,
      ...(token.scope ? { scope: token.scope } : undefined),
    };
  }

  const tokenTypes = new Set([TT_ACCESS_TOKEN, TT_JWT]);

  // RFC 8693 section 2.
  async function tokenExchange(ctx) {
    const { params } = ctx.oidc;
    if (!params.subject_token) throw invalidRequest('missing required parameter \'subject_token\'');
    if (!params.subject_token_type) throw invalidRequest('missing required parameter \'subject_token_type\'');
    if (!tokenTypes.has(params.subject_token_type)) {
      throw invalidRequest(`unsupported subject_token_type ${quote(params.subject_token_type)} (supported: ${[...tokenTypes].join(', ')})`);
    }
    if (params.actor_token !== undefined && !params.actor_token_type) {
      throw invalidRequest('actor_token_type is required with actor_token');
    }
    if (params.actor_token === undefined && params.actor_token_type !== undefined) {
      throw invalidRequest('actor_token_type must not be sent without actor_token');
    }
    if (params.actor_token_type !== undefined && !tokenTypes.has(params.actor_token_type)) {
      throw invalidRequest(`unsupported actor_token_type ${quote(params.actor_token_type)} (supported: ${[...tokenTypes].join(', ')})`);
    }
    const requested = params.requested_token_type ?? TT_ACCESS_TOKEN;
    if (!tokenTypes.has(requested)) {
      throw invalidRequest(`unsupported requested_token_type ${quote(requested)} (supported: ${[...tokenTypes].join(', ')})`);
    }
    const audiences = asList(params.audience);
    for (const audience of audiences) {
      if (!EXCHANGE_AUDIENCES.has(audience)) {
        throw invalidTarget(`audience ${quote(audience)} is not known (known: ${[...EXCHANGE_AUDIENCES].join(', ')})`);
      }
    }

    const subject = await verifyPresented('subject_token', params.subject_token, params.subject_token_type);
    let actor;
    if (params.actor_token !== undefined) {
      actor = await verifyPresented('actor_token', params.actor_token, params.actor_token_type);
    }
    // RFC 8693 section 4.4: a subject token's may_act names who may act.
    if (actor && subject.may_act && typeof subject.may_act === 'object') {
      const { sub, iss } = subject.may_act;
      if ((sub !== undefined && sub !== actor.sub) || (iss !== undefined && iss !== actor.iss)) {
        throw invalidGrant(`actor_token: sub ${quote(actor.sub)} is not allowed by the subject_token's may_act`);
      }
    }

    const claims = {
      exchanged_from: Object.fromEntries(Object.entries({
        token_type: params.subject_token_type,
        iss: subject.iss,
        sub: subject.sub,
        jti: subject.jti,
        client_id: subject.client_id,
        exp: subject.exp,
      }).filter(([, v]) => v !== undefined)),
    };
    if (actor) {
      claims.act = {
        sub: actor.sub,
        ...(actor.iss !== issuer ? { iss: actor.iss } : undefined),
        ...(subject.act ? { act: subject.act } : undefined),
      };
    } else if (subject.act) {
      claims.act = subject.act;
    }

    let scope = params.scope;
    if (scope === undefined && typeof subject.scope === 'string') scope = subject.scope;
    if (scope === undefined) scope = API_SCOPE;
    const { token, value } = await issue(ctx, {
      sub: subject.sub,
      scopes: scope.split(' ').filter(Boolean),
      gty: 'token_exchange',
      claims,
      audiences,
    });
    const jwtRequested = requested === TT_JWT;
    ctx.body = {
      access_token: value,
      issued_token_type: requested,
      // RFC 8693 section 2.2.1: N_A when the issued token is not an access
      // token (here: requested as a plain JWT), unless it is DPoP-bound.
      token_type: jwtRequested && token.tokenType === 'Bearer' ? 'N_A' : token.tokenType,
      expires_in: token.expiration,
      ...(token.scope ? { scope: token.scope } : undefined),
    };
  }

  provider.registerGrantType(
    JWT_BEARER,
    jwtBearer,
    ['assertion', 'scope', 'resource'],
    ['resource'],
  );
  provider.registerGrantType(
    TOKEN_EXCHANGE,
    tokenExchange,
    [
      'subject_token', 'subject_token_type', 'actor_token', 'actor_token_type',
      'requested_token_type', 'audience', 'resource', 'scope',
    ],
    ['resource', 'audience'],
  );
}

// oidc-provider authenticates (or at least identifies) a client on every
// token request; RFC 7523 and RFC 8693 make client authentication optional.
// A JWT bearer or token exchange request that names no client at all (no
// Authorization header, client_id, client_secret or client_assertion) is
// served as the `anonymous` client (token_endpoint_auth_method none): the
// body is read here and handed to oidc-provider with client_id=anonymous.
function rewriteAnonymous(req, res, next) {
  const isTokenPost = req.method === 'POST'
    && (req.url || '').split('?')[0] === '/token'
    && req.headers.authorization === undefined
    && /^application\/x-www-form-urlencoded/i.test(req.headers['content-type'] || '');
  if (!isTokenPost) {
    next();
    return;
  }
  const chunks = [];
  let size = 0;
  req.on('data', (chunk) => {
    size += chunk.length;
    if (size <= 56 * 1024) chunks.push(chunk);
  });
  req.on('error', () => res.destroy());
  req.on('end', () => {
    if (size > 56 * 1024) {
      res.statusCode = 413;
      res.end();
      return;
    }
    let body = Buffer.concat(chunks).toString('utf8');
    const form = new URLSearchParams(body);
    const grant = form.get('grant_type');
    if ((grant === JWT_BEARER || grant === TOKEN_EXCHANGE)
      && !form.has('client_id') && !form.has('client_secret') && !form.has('client_assertion')) {
      body += `${body ? '&' : ''}client_id=${ANONYMOUS}`;
      anonymousRequests.add(req);
    }
    // oidc-provider reads an already consumed body from req.body.
    req.body = body;
    next();
  });
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
        'none',
      ],
      enabledJWA: {
        // The provider's default is ES256, Ed25519 and EdDSA; the proxy can
        // also sign proofs with RSA keys.
        dPoPSigningAlgValues: ['ES256', 'EdDSA', 'Ed25519', 'PS256', 'RS256'],
      },
      ttl: {
        ClientCredentials: (ctx, token) => (token.clientId === 'short'
          ? SHORT_TTL
          : token.resourceServer?.accessTokenTTL || ACCESS_TOKEN_TTL),
        // Only the extension grants below issue AccessTokens here (they set
        // expiresIn themselves).
        AccessToken: () => ACCESS_TOKEN_TTL,
      },
      formats: {
        customizers: {
          // Claims the extension grants add to (or override in) their JWTs:
          // act, exchanged_from, aud.
          jwt(ctx, token, jwt) {
            const claims = extraClaims.get(token);
            if (claims) Object.assign(jwt.payload, claims);
          },
        },
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

  try {
    registerGrants(provider, issuer, providerRsa.publicKey);
  } catch (err) {
    fail('cannot register the extension grants', err);
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
    rewriteAnonymous(req, res, () => callback(req, res));
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
