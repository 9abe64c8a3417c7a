// Redeem the proofs of a NIP-61 nutzap with a stock cashu-ts wallet, as a customer's client would.
// Usage: node cashu_receive.mjs '{"mint": URL, "proofs": [...], "privkey": HEX}'
// Prints ONE JSON line: {"ok": true, "amount": N} or {"ok": false, "error": "..."}.
import { Wallet } from '@cashu/cashu-ts'

const { mint, proofs, privkey } = JSON.parse(process.argv[2])
try {
  const wallet = new Wallet(mint, { unit: 'sat' })
  await wallet.loadMint()
  const got = await wallet.receive(proofs, { privkey, requireDleq: true })
  const amount = got.reduce((sum, p) => sum + Number(p.amount), 0)
  console.log(JSON.stringify({ ok: true, amount }))
} catch (err) {
  console.log(JSON.stringify({ ok: false, error: String(err?.message ?? err) }))
}
