# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Text to speech: ``/v1/audio/speech``, named voices and the offline API."""
