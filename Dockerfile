# The serving image: Tandem without torch. Models are exported elsewhere (`tandem export`,
# which needs the `export` extra) and mounted at /models; the collection at /data.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY tandem tandem
COPY server server
COPY benchmarks benchmarks
COPY export export
# A home, so that --cache-dir's default (~/.cache/tandem) can be written.
RUN pip install --no-cache-dir . && useradd --create-home --uid 10001 tandem
USER tandem
EXPOSE 50051 8080 9464
ENTRYPOINT ["tandem"]
CMD ["serve", "--host=0.0.0.0", "--allow-remote", "--collection=/data", \
     "--bi-encoder=/models/bi-encoder", "--reranker=/models/cross-encoder"]
