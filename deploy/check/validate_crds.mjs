// Validates KEDA and Prometheus-operator objects with the published models
// of @kubernetes-models/keda and @kubernetes-models/prometheus-operator (the
// kinds' CRD OpenAPI schemas, compiled to validators).
//
// Usage, from target/deploy-npm (deploy/check/install.sh), where the
// packages resolve:
//   TOKITAI_CRD_OBJECTS=FILE.json node --input-type=module -e "$(cat deploy/check/validate_crds.mjs)"
// FILE.json: a JSON array of objects. Prints one line per object, "ok KIND
// NAME" or "invalid KIND NAME: why", and exits 1 if any is invalid or of a
// kind it has no schema for.
import { readFileSync } from "node:fs";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};

const objects = JSON.parse(readFileSync(process.env.TOKITAI_CRD_OBJECTS, "utf8"));
let failed = 0;
for (const obj of objects) {
  const key = `${obj.apiVersion}/${obj.kind}`;
  const name = obj.metadata?.name ?? "?";
  const Model = models[key];
  if (!Model) {
    console.log(`invalid ${key} ${name}: no published schema here for this kind`);
    failed++;
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`ok ${key} ${name}`);
  } catch (e) {
    console.log(`invalid ${key} ${name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
