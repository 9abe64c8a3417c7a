#!/usr/bin/env node
// A plain JavaScript NIP-90 customer, built only on nostr-tools and ws: it proves that a client
// outside this code base can use the worker. tests/test_js_client.py runs it.
//
//   node nip90_client.mjs --relay ws://127.0.0.1:PORT --dvm <hex pubkey> --mode nip44|clear \
//        --text "some text" [--kind 5790] [--top 2] [--timeout 30]
//
// It makes a key of its own, subscribes to kinds 7000 and kind+1000 with #e = the request id,
// waits for the relay's EOSE, publishes the job request (and waits for the relay's OK), then
// collects feedback until a result (or an `error` feedback) arrives; encrypted feedback and
// results are decrypted with NIP-44. It prints ONE JSON line on stdout with what it saw and
// exits 0; on a timeout, a rejected publish or an `error` feedback it prints the same JSON line
// with an "error" field (and the error on stderr) and exits 1. Exit 2: bad arguments.

import { parseArgs } from 'node:util'
import WebSocket from 'ws'
import { finalizeEvent, generateSecretKey, getPublicKey, nip44 } from 'nostr-tools'
import { Relay, useWebSocketImplementation } from 'nostr-tools/relay'

useWebSocketImplementation(WebSocket)

const FEEDBACK_KIND = 7000
// After the result, wait this long at most for feedback still on its way (the worker publishes
// feedback and result from separate tasks, so they may arrive in either order).
const FEEDBACK_GRACE_MS = 2000

function usage(message) {
  process.stderr.write(`nip90_client: ${message}\n` +
    'usage: node nip90_client.mjs --relay ws://… --dvm <hex pubkey> --mode nip44|clear ' +
    '--text "…" [--kind 5790] [--top N] [--timeout 30]\n')
  process.exit(2)
}

let args
try {
  args = parseArgs({
    options: {
      relay: { type: 'string' },
      dvm: { type: 'string' },
      mode: { type: 'string', default: 'nip44' },
      text: { type: 'string' },
      kind: { type: 'string', default: '5790' },
      top: { type: 'string' },
      timeout: { type: 'string', default: '30' },
    },
    strict: true,
  }).values
} catch (err) {
  usage(err.message)
}
if (!args.relay) usage('--relay is required')
if (!/^[0-9a-f]{64}$/.test(args.dvm ?? '')) usage('--dvm must be a 64-hex public key')
if (!['nip44', 'clear'].includes(args.mode)) usage('--mode must be nip44 or clear')
if (args.text === undefined) usage('--text is required')
const kind = Number(args.kind)
const timeoutMs = Number(args.timeout) * 1000
if (!Number.isInteger(kind) || kind < 5000 || kind > 5999) usage('--kind must be 5000-5999')
if (!(timeoutMs > 0)) usage('--timeout must be a positive number of seconds')

const encrypted = args.mode === 'nip44'
const sk = generateSecretKey()
const pk = getPublicKey(sk)
const conversationKey = nip44.getConversationKey(sk, args.dvm)

// The job request, as NIP-90 describes it: inputs and params as tags, or, for a private request,
// those tags as a JSON array encrypted in the content, with ["encrypted"] and the provider's p tag.
const jobTags = [['i', args.text, 'text']]
if (args.top !== undefined) jobTags.push(['param', 'top', args.top])
const request = finalizeEvent({
  kind,
  created_at: Math.floor(Date.now() / 1000),
  content: encrypted ? nip44.encrypt(JSON.stringify(jobTags), conversationKey) : '',
  tags: encrypted ? [['p', args.dvm], ['encrypted']] : [...jobTags, ['p', args.dvm]],
}, sk)

const seen = {
  request_id: request.id,
  customer: pk,
  mode: args.mode,
  request_event: request,
  feedback: [],
  feedback_encrypted: null,
  result: null,
  result_encrypted: null,
  result_event: null,
  feedback_events: [],
  ignored_events: [],
  invalid_events: [],
  notices: [],
}

function tagValue(event, name) {
  const tag = event.tags.find((t) => t[0] === name && t.length >= 2)
  return tag ? tag[1] : undefined
}

// nostr-tools rejects with an Error, or with the WebSocket's error event on a failed connect.
const describe = (err) => err?.message || err?.error?.message || err?.type || String(err)

const hasTag = (event, name) => event.tags.some((t) => t[0] === name)

function decryptIfNeeded(event) {
  if (!hasTag(event, 'encrypted') || !event.content) return event.content
  return nip44.decrypt(event.content, nip44.getConversationKey(sk, event.pubkey))
}

function finish(error) {
  if (error) seen.error = error
  process.stdout.write(JSON.stringify(seen) + '\n')
  if (error) process.stderr.write(`nip90_client: ${error}\n`)
  // ws keeps the process alive until the socket closes; exit once stdout is flushed.
  process.stdout.write('', () => process.exit(error ? 1 : 0))
}

let relay
let done = false
let graceTimer = null
const hardTimer = setTimeout(() => {
  if (done) return
  done = true
  finish(seen.result
    ? null
    : `timed out after ${args.timeout}s waiting for the result of ${request.id}`)
}, timeoutMs)

function complete(error = null) {
  if (done) return
  done = true
  clearTimeout(hardTimer)
  if (graceTimer) clearTimeout(graceTimer)
  try { relay?.close() } catch { /* closing is best effort */ }
  finish(error)
}

function onEvent(event) {
  // Only the addressed DVM's answers to this request count; anything else is recorded.
  if (event.pubkey !== args.dvm || tagValue(event, 'e') !== request.id) {
    seen.ignored_events.push(event)
    return
  }
  try {
    if (event.kind === FEEDBACK_KIND) {
      const statusTag = event.tags.find((t) => t[0] === 'status') ?? []
      const isEnc = hasTag(event, 'encrypted')
      // NIP-90: ["status", status, extra-info]; for a private job the info is in the content.
      const message = isEnc ? decryptIfNeeded(event) : (statusTag[2] ?? event.content ?? '')
      seen.feedback.push({ status: statusTag[1] ?? null, message, encrypted: isEnc,
        progress: tagValue(event, 'progress') ?? null, p: tagValue(event, 'p') ?? null })
      seen.feedback_events.push(event)
      seen.feedback_encrypted = seen.feedback_encrypted === null
        ? isEnc : seen.feedback_encrypted && isEnc
      if (statusTag[1] === 'error') complete(`the DVM reported an error: ${message}`)
      else if (seen.result && seen.feedback.some((f) => f.status === 'processing')) complete()
    } else if (event.kind === kind + 1000) {
      if (seen.result_event) return // a second result: keep the first
      seen.result_event = event
      seen.result_encrypted = hasTag(event, 'encrypted')
      seen.result = JSON.parse(decryptIfNeeded(event))
      if (seen.feedback.some((f) => f.status === 'processing')) complete()
      else graceTimer = setTimeout(() => complete(), FEEDBACK_GRACE_MS)
    } else {
      seen.ignored_events.push(event)
    }
  } catch (err) {
    complete(`could not read event ${event.id} (kind ${event.kind}): ${describe(err)}`)
  }
}

try {
  relay = await Relay.connect(args.relay)
  relay.onnotice = (msg) => seen.notices.push(msg)
  relay.onclose = () => { if (!done) complete('the relay closed the connection') }
  // Subscribe before publishing, and wait for EOSE so the relay has the subscription in place.
  await new Promise((resolve) => {
    relay.subscribe([{ kinds: [FEEDBACK_KIND, kind + 1000], '#e': [request.id] }], {
      onevent: onEvent,
      oninvalidevent: (event) => seen.invalid_events.push(event),
      oneose: resolve,
      onclose: (reason) => { if (!done) complete(`subscription closed by the relay: ${reason}`) },
    })
  })
  relay.publishTimeout = Math.max(relay.publishTimeout, 10000)
  await relay.publish(request) // resolves on ["OK", id, true, …], rejects on false
} catch (err) {
  complete(`could not send the request to ${args.relay}: ${describe(err)}`)
}
