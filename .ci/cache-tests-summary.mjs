// Scores a run of the HTTP caching test suite (cache-tests.fyi) the way the site does
// (a test whose dependency or setup failed is not a pass), beside the suite's published
// results, and names the required tests that nginx or Varnish pass and the layer fails.
//
//   node .ci/cache-tests-summary.mjs SUITE_DIR RESULTS.json [--min-required N] [--min-optimal N]
//
// SUITE_DIR is the suite's directory (the npm package http-cache-tests, or a checkout).
import fs from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const [suiteDir, ours, ...rest] = process.argv.slice(2)
const flag = (name) => {
  const i = rest.indexOf(name)
  return i === -1 ? 0 : Number(rest[i + 1])
}
const suites = (await import(pathToFileURL(path.resolve(suiteDir, 'tests/index.mjs')))).default
const byId = new Map(suites.flatMap((suite) => suite.tests.map((test) => [test.id, test])))

// As the site counts (its lib/results.mjs): a test passes if it ran, returned true, and
// every test it depends on passed; a failed setup is not a pass.
const passes = (results, id, seen = new Set()) => {
  const test = byId.get(id)
  if (test === undefined || seen.has(id)) return false
  seen.add(id)
  if (results[id] !== true) return false
  return (test.depends_on ?? []).every((dep) => passes(results, dep, new Set(seen)))
}

const score = (results) => {
  const counts = { required: [0, 0], optimal: [0, 0] }
  const passed = new Set()
  for (const suite of suites) {
    for (const test of suite.tests) {
      const kind = test.kind ?? 'required'
      if (!(kind in counts)) continue
      counts[kind][1]++
      if (passes(results, test.id)) {
        counts[kind][0]++
        passed.add(test.id)
      }
    }
  }
  return { counts, passed }
}

const rows = [['HttpCacheLayer (this run)', score(JSON.parse(fs.readFileSync(ours, 'utf8')))]]
const published = path.resolve(suiteDir, 'results')
for (const file of fs.readdirSync(published).filter((f) => f.endsWith('.json')).sort()) {
  const name = file.replace(/\.json$/, '')
  if (['chrome', 'firefox', 'safari'].includes(name)) continue // browsers: private caches
  rows.push([name, score(JSON.parse(fs.readFileSync(path.join(published, file), 'utf8')))])
}
const [, mine] = rows[0]
const others = rows.slice(1).sort((a, b) => b[1].counts.required[0] - a[1].counts.required[0])
console.log(`| cache | required (${mine.counts.required[1]}) | optimal (${mine.counts.optimal[1]}) |`)
console.log('|---|---|---|')
for (const [name, { counts }] of [rows[0], ...others]) {
  console.log(`| ${name} | ${counts.required[0]} | ${counts.optimal[0]} |`)
}

const references = rows.filter(([name]) => ['nginx', 'varnish'].includes(name))
const missed = []
for (const suite of suites) {
  for (const test of suite.tests) {
    if ((test.kind ?? 'required') !== 'required' || mine.passed.has(test.id)) continue
    const by = references.filter(([, s]) => s.passed.has(test.id)).map(([name]) => name)
    if (by.length) missed.push(`${test.id} (passed by ${by.join(', ')})`)
  }
}
console.log(`\nrequired tests nginx or Varnish pass and this run fails: ${missed.length}`)
for (const id of missed) console.log(`  ${id}`)

const [required, optimal] = [mine.counts.required[0], mine.counts.optimal[0]]
if (required < flag('--min-required') || optimal < flag('--min-optimal')) {
  console.error(`below the floor: required ${required} (>= ${flag('--min-required')}), optimal ${optimal} (>= ${flag('--min-optimal')})`)
  process.exit(1)
}
