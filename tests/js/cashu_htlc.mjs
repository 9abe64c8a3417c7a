// Pay on delivery (NUT-14 HTLC) with a stock cashu-ts wallet, as a customer's or a provider's
// JavaScript client would; used by tests/test_js_htlc.py against a local Nutshell mint.
// Usage: node cashu_htlc.mjs COMMAND '{JSON arguments}'
//   keygen                                   -> {privkey, pubkey}   (a fresh secp256k1 key pair)
//   pay     {mint, creq, extra}              -> {token, amount, change, options}
//           mint amount + extra sat (the mint must pay its own quotes: FakeWallet), then pay the
//           NUT-18 request `creq` with the HTLC lock its nut10 asks for, as a cashuB token with DLEQ
//   preimage {mint, token}                   -> {states, preimage}
//           NUT-07 checkstate of the token's proofs; the preimage from a spent proof's witness,
//           checked against the hash lock of its secret
//   redeem  {mint, token, privkey, preimage, wrong_preimage?}  -> {amount, wrong_error?}
//           swap an HTLC token with the preimage and the lock key's signature (first with
//           `wrong_preimage`, if given, which the mint must refuse)
// Prints ONE JSON line: {"ok": true, ...} or {"ok": false, "error": "..."}.
import {
  Wallet, PaymentRequest, getEncodedToken, getHTLCWitnessPreimage, verifyHTLCHash,
  parseHTLCSecret, getDataField, createRandomSecretKey, getPubKeyFromPrivKey, hasValidDleq,
} from '@cashu/cashu-ts'

const hex = (bytes) => Buffer.from(bytes).toString('hex')
const sum = (proofs) => proofs.reduce((total, p) => total + Number(p.amount), 0)

async function openWallet(mint) {
  const wallet = new Wallet(mint, { unit: 'sat' })
  await wallet.loadMint()
  return wallet
}

async function mintEcash(wallet, amount) {
  const quote = await wallet.createMintQuoteBolt11(amount)
  for (let i = 0; i < 100; i++) {   // FakeWallet pays at once; allow it a moment all the same
    const state = (await wallet.checkMintQuoteBolt11(quote.quote)).state
    if (state === 'PAID' || state === 'ISSUED') break
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  return wallet.mintProofsBolt11(amount, quote)
}

// A cashuB token (short keyset ids, as cashu-ts v4 writes them) from its proofs; the helper
// keeps DLEQ proofs unless told `removeDleq`.
const encode = (mint, proofs) => getEncodedToken({ mint, unit: 'sat', proofs })

const commands = {
  async keygen() {
    const secret = createRandomSecretKey()
    return { privkey: hex(secret), pubkey: hex(getPubKeyFromPrivKey(secret)) }
  },

  async pay({ mint, creq, extra = 0 }) {
    const request = PaymentRequest.fromEncodedRequest(creq)
    const amount = Number(request.amount)
    const options = request.toP2PKOptions()
    if (!options?.hashlock) throw new Error(`the request asks for no HTLC lock: ${JSON.stringify(options)}`)
    const wallet = await openWallet(mint)
    const funds = await mintEcash(wallet, amount + extra)
    const { keep, send } = await wallet.ops.send(amount, funds).asP2PK(options).run()
    const keyset = wallet.keyChain.getKeyset(send[0].id)
    return {
      token: encode(mint, send), amount: sum(send), change: sum(keep), options,
      dleq: send.map((p) => hasValidDleq(p, keyset, { require: true })), ids: send.map((p) => p.id),
    }
  },

  async preimage({ mint, token }) {
    const wallet = await openWallet(mint)
    const proofs = wallet.decodeToken(token).proofs
    const states = await wallet.checkProofsStates(proofs)
    let preimage = null
    proofs.forEach((proof, i) => {
      const found = getHTLCWitnessPreimage(states[i].witness ?? undefined)
      const hash = getDataField(parseHTLCSecret(proof.secret))
      if (preimage === null && states[i].state === 'SPENT' && found && verifyHTLCHash(found, hash)) {
        preimage = found
      }
    })
    return { states: states.map((s) => s.state), preimage }
  },

  async redeem({ mint, token, privkey, preimage, wrong_preimage }) {
    const wallet = await openWallet(mint)
    const proofs = wallet.decodeToken(token).proofs
    // cashu-ts has no receive option for an HTLC preimage: it goes in the witness, which the
    // P2PK signing step (ReceiveBuilder.privkey) keeps while adding its signature.
    const withPreimage = (key) => proofs.map((p) => ({ ...p, witness: { preimage: key, signatures: [] } }))
    let wrongError
    if (wrong_preimage) {
      try {
        await wallet.ops.receive(withPreimage(wrong_preimage)).privkey(privkey).requireDleq(true).run()
        throw new Error('the mint accepted a wrong preimage')
      } catch (err) {
        if (String(err?.message).includes('accepted a wrong preimage')) throw err
        wrongError = String(err?.message ?? err)
      }
    }
    const got = await wallet.ops.receive(withPreimage(preimage)).privkey(privkey).requireDleq(true).run()
    return { amount: sum(got), wrong_error: wrongError }
  },
}

const [command, args] = process.argv.slice(2)
try {
  if (!(command in commands)) throw new Error(`unknown command ${command}`)
  const result = await commands[command](JSON.parse(args ?? '{}'))
  console.log(JSON.stringify({ ok: true, ...result }))
} catch (err) {
  console.log(JSON.stringify({ ok: false, error: String(err?.message ?? err) }))
}
