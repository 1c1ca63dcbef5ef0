// Shamal's development and test OpenID provider: node-oidc-provider with
// static clients, three interactive accounts and JWT access tokens for the
// Shamal APIs. Started (and its keys generated) by scripts/ensure-oidc.sh.
// NOT for production: the keys are on disk in the clear, the client
// secrets are `<client id>-secret`, and anyone can log in as alice, bob or
// carol without a password (devInteractions).
//
// Environment:
//   SHAMAL_OIDC_PORT           port on 127.0.0.1 (default 9411)
//   SHAMAL_OIDC_ISSUER         issuer URL (default http://127.0.0.1:<port>)
//   SHAMAL_OIDC_JWKS           the signing keys, a JWKS with private keys;
//                              generated there when absent (default
//                              .deps/oidc/jwks.json)
//   SHAMAL_OIDC_AUDIENCE       `aud` of the access tokens (default shamal)
//   SHAMAL_OIDC_TOKEN_TTL_S    access token lifetime (default 3600)
//   SHAMAL_OIDC_WEB_REDIRECTS  comma-separated redirect URIs of shamal-web
//                              (default: `shamal up`'s registry on 8200, and
//                              the registry's web-login tests on 18290/18291)

import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';

import Provider, { errors } from 'oidc-provider';

const PORT = Number.parseInt(process.env.SHAMAL_OIDC_PORT || '9411', 10);
const ISSUER = process.env.SHAMAL_OIDC_ISSUER || `http://127.0.0.1:${PORT}`;
const JWKS_PATH = resolve(process.env.SHAMAL_OIDC_JWKS || '.deps/oidc/jwks.json');
const AUDIENCE = process.env.SHAMAL_OIDC_AUDIENCE || 'shamal';
const TOKEN_TTL_S = Number.parseInt(process.env.SHAMAL_OIDC_TOKEN_TTL_S || '3600', 10);
const WEB_REDIRECTS = (process.env.SHAMAL_OIDC_WEB_REDIRECTS || [
  'http://127.0.0.1:8200/oidc/callback',
  'http://localhost:8200/oidc/callback',
  'http://127.0.0.1:18290/oidc/callback',
  'http://localhost:18291/oidc/callback',
].join(','))
  .split(',')
  .map((uri) => uri.trim())
  .filter(Boolean);

// The resource indicator (RFC 8707) of the Shamal APIs. Clients need not
// send it: it is every token's default resource.
const RESOURCE = 'urn:shamal:api';
const RESOURCE_SCOPE = 'shamal';

// What each client-credentials client's tokens say. `roles` absent: the
// token has no roles claim at all.
const SERVICE_CLIENTS = {
  'shamal-viewer': { roles: ['viewer'], tenant: 'acme', groups: ['analysts'] },
  'shamal-inference': { roles: ['inference'], tenant: 'acme', groups: ['apps'] },
  'shamal-inference-globex': { roles: ['inference'], tenant: 'globex', groups: ['apps'] },
  'shamal-data-scientist': { roles: ['data-scientist'], tenant: 'acme', groups: ['ml'] },
  'shamal-release-manager': { roles: ['release-manager'], tenant: 'acme', groups: ['release'] },
  'shamal-admin': { roles: ['admin'], tenant: 'acme', groups: ['ops'] },
  'shamal-noroles': { tenant: 'acme', groups: [] },
};

// The people who log in interactively (any password; devInteractions).
const ACCOUNTS = {
  alice: { name: 'Alice', roles: ['release-manager'], tenant: 'acme', groups: ['release'] },
  bob: { name: 'Bob', roles: ['viewer'], tenant: 'acme', groups: ['analysts'] },
  carol: { name: 'Carol', roles: ['admin'], tenant: 'acme', groups: ['ops'] },
};

function tokenClaims({ roles, tenant, groups }) {
  return {
    ...(roles ? { roles } : {}),
    ...(tenant ? { tenant } : {}),
    ...(groups ? { groups } : {}),
  };
}

// The signing keys: RS256 (access and ID tokens), ES256 and EdDSA
// (published in the JWKS; the tests forge tokens with them). Generated once.
function loadOrGenerateKeys(path) {
  if (!existsSync(path)) {
    const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
    const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
    const ed = generateKeyPairSync('ed25519').privateKey.export({ format: 'jwk' });
    const suffix = randomUUID().slice(0, 8);
    const jwks = {
      keys: [
        { ...rsa, kid: `shamal-dev-rs256-${suffix}`, alg: 'RS256', use: 'sig' },
        { ...ec, kid: `shamal-dev-es256-${suffix}`, alg: 'ES256', use: 'sig' },
        { ...ed, kid: `shamal-dev-eddsa-${suffix}`, alg: 'EdDSA', use: 'sig' },
      ],
    };
    mkdirSync(dirname(path), { recursive: true });
    const tmp = `${path}.${process.pid}.tmp`;
    writeFileSync(tmp, `${JSON.stringify(jwks, null, 2)}\n`, { mode: 0o600 });
    renameSync(tmp, path);
    console.log(`oidc-dev: generated signing keys in ${path}`);
  }
  return JSON.parse(readFileSync(path, 'utf8'));
}

const clients = [
  ...Object.keys(SERVICE_CLIENTS).map((clientId) => ({
    client_id: clientId,
    client_secret: `${clientId}-secret`,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: RESOURCE_SCOPE,
    token_endpoint_auth_method: 'client_secret_basic',
  })),
  {
    // The `shamal` CLI: a public native client (RFC 8252). Loopback
    // redirects on any port match the registered port-less URIs.
    client_id: 'shamal-cli',
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback', 'http://[::1]/callback'],
    scope: `openid profile offline_access ${RESOURCE_SCOPE}`,
  },
  {
    // The registry's web UI: a confidential web client.
    client_id: 'shamal-web',
    client_secret: 'shamal-web-secret',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: WEB_REDIRECTS,
    scope: `openid profile offline_access ${RESOURCE_SCOPE}`,
    token_endpoint_auth_method: 'client_secret_basic',
  },
];

const configuration = {
  clients,
  jwks: loadOrGenerateKeys(JWKS_PATH),
  scopes: ['openid', 'profile', 'offline_access', RESOURCE_SCOPE],
  claims: { openid: ['sub'], profile: ['name'] },
  cookies: { keys: ['shamal-oidc-dev-cookies-not-secret'] },
  pkce: { required: () => true },
  ttl: {
    AccessToken: TOKEN_TTL_S,
    ClientCredentials: TOKEN_TTL_S,
    AuthorizationCode: 60,
    DeviceCode: 600,
    IdToken: 3600,
    Grant: 14 * 24 * 3600,
    Interaction: 3600,
    Session: 14 * 24 * 3600,
    RefreshToken: 14 * 24 * 3600,
  },
  features: {
    clientCredentials: { enabled: true },
    deviceFlow: { enabled: true },
    devInteractions: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => RESOURCE,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, resourceIndicator) => {
        if (resourceIndicator !== RESOURCE) {
          throw new errors.InvalidTarget(`unknown resource ${resourceIndicator}; use ${RESOURCE}`);
        }
        return {
          scope: RESOURCE_SCOPE,
          audience: AUDIENCE,
          accessTokenTTL: TOKEN_TTL_S,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  // roles, tenant and groups of the client (client credentials) or the
  // logged-in account (authorization code, device code, refresh).
  extraTokenClaims: async (_ctx, token) => {
    if (token.kind === 'ClientCredentials') {
      const client = SERVICE_CLIENTS[token.clientId];
      return client ? tokenClaims(client) : undefined;
    }
    const account = token.accountId ? ACCOUNTS[token.accountId] : undefined;
    return account ? tokenClaims(account) : undefined;
  },
  findAccount: async (_ctx, id) => {
    const account = ACCOUNTS[id];
    if (!account) {
      return undefined;
    }
    return {
      accountId: id,
      claims: async () => ({ sub: id, name: account.name }),
    };
  },
};

const provider = new Provider(ISSUER, configuration);
provider.on('server_error', (_ctx, error) => console.error('oidc-dev: server error', error));

const server = provider.listen(PORT, '127.0.0.1', () => {
  console.log(`oidc-dev: issuer ${ISSUER} listening on 127.0.0.1:${PORT} (keys ${JWKS_PATH}, audience ${AUDIENCE})`);
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
