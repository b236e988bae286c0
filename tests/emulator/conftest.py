"""Fixtures for the emulator's tests: the official ``pangea-sdk`` pointed at the running emulator."""

from __future__ import annotations

from typing import Any

import pytest
from pangea.config import PangeaConfig
from pangea.services import AuthN

from tests.conftest import RunningEmulator


def sdk_for(emu: RunningEmulator, token: str) -> AuthN:
    """The official SDK client on the emulator, without its 5xx retries (the fault tests count requests)."""
    return AuthN(token, config=PangeaConfig(base_url_template=emu.base_url, request_retries=0))


@pytest.fixture
def sdk(emu: RunningEmulator) -> AuthN:
    """The SDK with the service token (every endpoint)."""
    return sdk_for(emu, emu.service_token)


@pytest.fixture
def public_sdk(emu: RunningEmulator) -> AuthN:
    """The SDK with the client token (``/v2/client/*`` only)."""
    return sdk_for(emu, emu.client_token)


def log_in(emu: RunningEmulator, sdk: AuthN, email: str, **options: Any) -> Any:
    """A new session of ``email``, as the web app gets it: hosted-login code exchanged at userinfo."""
    code = emu.admin.login(email, **options)
    result = sdk.client.userinfo(code).result
    assert result is not None and result.active_token is not None
    return result
