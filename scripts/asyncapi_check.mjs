// Validates a sample's AsyncAPI document with the official parser
// (@asyncapi/parser, installed by scripts/services.sh into ASYNCAPI_PARSER_DIR)
// and checks that it names every publication and subscription of the sample.
//
// Usage: node scripts/asyncapi_check.mjs FILE --send Msg,Msg --receive Msg,Msg [--reply Msg]
// Exit status 0 when the parser reports no error and every expectation holds;
// one line of verdict either way.
import { createRequire } from 'module';
import { readFileSync } from 'fs';

const dir = process.env.ASYNCAPI_PARSER_DIR;
if (!dir) {
  console.error('ASYNCAPI_PARSER_DIR is not set (scripts/services.sh ensure_asyncapi_parser sets it)');
  process.exit(2);
}
const require = createRequire(`${dir}/`);
const { Parser, DiagnosticSeverity } = require('@asyncapi/parser');

const [file, ...rest] = process.argv.slice(2);
const expected = { send: [], receive: [], reply: [] };
for (let i = 0; i < rest.length; i += 2) {
  const key = rest[i].replace(/^--/, '');
  if (!(key in expected)) {
    console.error(`unknown option ${rest[i]}`);
    process.exit(2);
  }
  expected[key] = (rest[i + 1] || '').split(',').filter(Boolean);
}

const text = readFileSync(file, 'utf8');
const { document, diagnostics } = await new Parser().parse(text);
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
const problems = errors.map((d) => `${d.code}: ${d.message} at ${JSON.stringify(d.path)}`);
if (!document) problems.push('the document could not be parsed');

const named = { send: new Set(), receive: new Set(), reply: new Set() };
if (document) {
  for (const operation of document.operations().all()) {
    const action = operation.action();
    for (const message of operation.messages().all()) named[action]?.add(message.name());
    const reply = operation.reply();
    if (reply) for (const message of reply.messages().all()) named.reply.add(message.name());
  }
}
for (const [action, names] of Object.entries(expected)) {
  for (const name of names) {
    if (!named[action].has(name)) problems.push(`no ${action} operation names ${name}`);
  }
}
const counts = `${document ? document.operations().all().length : 0} operations, ${document ? document.channels().all().length : 0} channels, ${errors.length} errors`;
if (problems.length) {
  console.log(`asyncapi ${file}: ${counts}: FAIL`);
  for (const p of problems) console.log(`  ${p}`);
  process.exit(1);
}
console.log(`asyncapi ${file}: ${counts}; sends ${[...named.send].join(', ')}; receives ${[...named.receive].join(', ')}: ok`);
