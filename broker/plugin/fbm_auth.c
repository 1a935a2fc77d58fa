/*
 * fbm_auth: the federation's connect-time check, as a Mosquitto 2.0 plugin.
 *
 * Mosquitto's own options cannot say "the MQTT username is the certificate's CN, the
 * client id belongs to that identity, and this identity is not revoked":
 *   - with use_identity_as_username, no plugin sees the connection, and a revoked cert
 *     keeps working until the broker restarts (the CRL is not reloaded on SIGHUP);
 *   - any client may use any client id, so a node could take over another party's
 *     session (kicking it off and inheriting its subscriptions).
 * So the listener asks for a certificate AND a username, and this plugin admits a client
 * only if
 *   1. the username equals the CN of the certificate it presented (chained to our CA by TLS),
 *   2. the client id is the username, or the username followed by ':' and any suffix
 *      (identity names cannot contain ':'), and
 *   3. the certificate's SHA-256 fingerprint is not listed in the revoked file (re-read
 *      when it changes), so a revoked cert stays refused even if its name is re-enrolled.
 * Mosquitto calls the same check for every connected client on SIGHUP, so revoking an
 * identity and reloading disconnects it at once; its reconnections are refused.
 *
 * Options: plugin_opt_revoked_file PATH (lines "FINGERPRINT NAME", hex sha256 of the DER cert).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/x509.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

static mosquitto_plugin_id_t *plugin_id = NULL;
static char revoked_path[4096] = "";
static char *revoked = NULL; /* "\nFINGERPRINT NAME\n..." */
static struct timespec revoked_mtime = {0, 0};
static off_t revoked_size = -1;

static void load_revoked(void)
{
	struct stat st;
	if(revoked_path[0] == '\0'){
		return;
	}
	if(stat(revoked_path, &st) != 0){
		free(revoked);
		revoked = NULL;
		revoked_size = -1;
		return;
	}
	if(revoked && st.st_size == revoked_size && st.st_mtim.tv_sec == revoked_mtime.tv_sec
			&& st.st_mtim.tv_nsec == revoked_mtime.tv_nsec){
		return;
	}
	FILE *f = fopen(revoked_path, "r");
	if(!f){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "fbm_auth: cannot read %s", revoked_path);
		return;
	}
	char *buf = calloc((size_t)st.st_size + 3, 1);
	if(!buf){
		fclose(f);
		return;
	}
	buf[0] = '\n';
	size_t n = fread(buf + 1, 1, (size_t)st.st_size, f);
	fclose(f);
	buf[n + 1] = '\n';
	buf[n + 2] = '\0';
	free(revoked);
	revoked = buf;
	revoked_size = st.st_size;
	revoked_mtime = st.st_mtim;
}

static int is_revoked(X509 *cert)
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int md_len = 0;
	char needle[2 * EVP_MAX_MD_SIZE + 3];
	load_revoked();
	if(!revoked){
		return 0;
	}
	if(!X509_digest(cert, EVP_sha256(), md, &md_len)){
		return 1; /* fail closed */
	}
	needle[0] = '\n';
	for(unsigned int i = 0; i < md_len; i++){
		snprintf(needle + 1 + 2 * i, 3, "%02x", md[i]);
	}
	needle[1 + 2 * md_len] = ' ';
	needle[2 + 2 * md_len] = '\0';
	return strstr(revoked, needle) != NULL;
}

static int refuse(const char *client_id, const char *username, const char *why)
{
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "fbm_auth: refused client '%s' (username '%s'): %s",
			client_id ? client_id : "", username ? username : "", why);
	return MOSQ_ERR_AUTH;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	const char *client_id = mosquitto_client_id(ed->client);
	const char *username = ed->username;
	char cn[256];
	(void)event;
	(void)userdata;

	if(!username || !username[0]){
		return refuse(client_id, username, "no username (it must be the certificate's name)");
	}
	X509 *cert = mosquitto_client_certificate(ed->client);
	if(!cert){
		return refuse(client_id, username, "no client certificate");
	}
	int n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn, sizeof(cn));
	int revoked_cert = is_revoked(cert);
	X509_free(cert);
	if(n <= 0 || strcmp(cn, username) != 0){
		return refuse(client_id, username, "username is not the certificate's common name");
	}
	size_t ulen = strlen(username);
	if(!client_id || !(strcmp(client_id, username) == 0
			|| (strncmp(client_id, username, ulen) == 0 && client_id[ulen] == ':'))){
		return refuse(client_id, username, "client id must be the identity name or NAME:suffix");
	}
	if(revoked_cert){
		return refuse(client_id, username, "certificate revoked");
	}
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5){
			return 5;
		}
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data, struct mosquitto_opt *opts, int opt_count)
{
	(void)user_data;
	plugin_id = identifier;
	for(int i = 0; i < opt_count; i++){
		if(strcmp(opts[i].key, "revoked_file") == 0){
			snprintf(revoked_path, sizeof(revoked_path), "%s", opts[i].value);
		}
	}
	load_revoked();
	mosquitto_log_printf(MOSQ_LOG_INFO, "fbm_auth: loaded (revoked list: %s)", revoked_path[0] ? revoked_path : "none");
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *opts, int opt_count)
{
	(void)user_data;
	(void)opts;
	(void)opt_count;
	free(revoked);
	revoked = NULL;
	revoked_size = -1;
	return mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
}
