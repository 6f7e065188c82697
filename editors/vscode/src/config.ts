// Where the server is and which token to send. Both clients (this one and the Neovim
// plugin) look in the same places, in the same order: the editor's own setting, then
// the environment (KODKOD_ENDPOINT, KODKOD_TOKEN), then the default endpoint.
export const DEFAULT_ENDPOINT = "http://127.0.0.1:8080";

export interface Resolved {
  endpoint: string;
  token?: string;
  endpointSource: "settings" | "env" | "default";
}

export function resolveConfig(
  settingEndpoint: string | undefined,
  storedToken: string | undefined,
  env: Record<string, string | undefined> = process.env,
): Resolved {
  const fromSetting = settingEndpoint?.trim();
  const fromEnv = env.KODKOD_ENDPOINT?.trim();
  let endpoint = DEFAULT_ENDPOINT;
  let endpointSource: Resolved["endpointSource"] = "default";
  if (fromSetting) {
    endpoint = fromSetting;
    endpointSource = "settings";
  } else if (fromEnv) {
    endpoint = fromEnv;
    endpointSource = "env";
  }
  // "http://host:8080/" and "http://host:8080" are the same server: routes are appended.
  endpoint = endpoint.replace(/\/+$/, "");
  const token = storedToken?.trim() || env.KODKOD_TOKEN?.trim() || undefined;
  return { endpoint, token, endpointSource };
}
