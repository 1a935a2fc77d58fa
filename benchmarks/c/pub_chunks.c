/* Publish a file as QoS-1 chunks of CHUNK bytes over ONE TLS connection with libmosquitto:
 * the C baseline for benchmarks/transfer.py (the same chunking fedbiomq uses).
 *   pub_chunks HOST PORT CAFILE CERT KEY USER CLIENT_ID TOPIC FILE CHUNK
 * Exits once every chunk is acknowledged (PUBACK). */
#include <mosquitto.h>
#include <stdio.h>
#include <stdlib.h>

static int acked = 0, total = 0;

static void on_publish(struct mosquitto *m, void *obj, int mid) { (void)m; (void)obj; (void)mid; acked++; }

int main(int argc, char **argv) {
    if (argc != 11) { fprintf(stderr, "usage: pub_chunks HOST PORT CAFILE CERT KEY USER ID TOPIC FILE CHUNK\n"); return 64; }
    FILE *f = fopen(argv[9], "rb");
    if (!f) { perror(argv[9]); return 66; }
    fseek(f, 0, SEEK_END); long size = ftell(f); fseek(f, 0, SEEK_SET);
    char *data = malloc(size);
    if (!data || fread(data, 1, size, f) != (size_t)size) { fprintf(stderr, "read failed\n"); return 66; }
    long chunk = atol(argv[10]);
    mosquitto_lib_init();
    struct mosquitto *m = mosquitto_new(argv[7], true, NULL);
    mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
    mosquitto_tls_set(m, argv[3], NULL, argv[4], argv[5], NULL);
    mosquitto_username_pw_set(m, argv[6], NULL);
    mosquitto_max_inflight_messages_set(m, 20);
    mosquitto_publish_callback_set(m, on_publish);
    if (mosquitto_connect(m, argv[1], atoi(argv[2]), 30) != MOSQ_ERR_SUCCESS) { fprintf(stderr, "connect failed\n"); return 69; }
    for (long off = 0; off < size; off += chunk) {
        long n = size - off < chunk ? size - off : chunk;
        mosquitto_publish(m, NULL, argv[8], (int)n, data + off, 1, false);
        total++;
    }
    while (acked < total) {
        if (mosquitto_loop(m, 1000, 1) != MOSQ_ERR_SUCCESS) { fprintf(stderr, "connection lost\n"); return 70; }
    }
    mosquitto_disconnect(m);
    mosquitto_destroy(m);
    mosquitto_lib_cleanup();
    free(data);
    return 0;
}
