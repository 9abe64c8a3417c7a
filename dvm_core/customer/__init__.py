"""The customer's side, for scripts and customer software (`dvm job`, `dvm federate`,
`examples/customer/`): find a DVM's terms, send a job, pay only what was announced, follow it,
fetch and decrypt its result, get change and refunds back.

Import from here: this is the customer's public API.
"""

from dvm_core.payments.p2pk_keys import load_or_create_p2pk_key
from dvm_core.payments.wallet import EcashWallet
from dvm_core.payments.wallet_types import PaymentError
from dvm_core.state.keyfiles import KeyFileError, read_key_file, write_key_file

from .directory import DvmInfo, find_dvms
from .progress import ProgressMeter
from .client import (Customer, Delivery, JobFailed, PaymentDeclined, download_artifacts, open_delivery,
                     result_json, state_keeper, upload_dataset)

__all__ = ["Customer", "ProgressMeter", "Delivery", "JobFailed", "PaymentDeclined", "download_artifacts", "open_delivery",
           "result_json", "state_keeper",
           "upload_dataset", "KeyFileError", "read_key_file", "write_key_file", "EcashWallet",
           "PaymentError", "load_or_create_p2pk_key", "DvmInfo", "find_dvms"]
