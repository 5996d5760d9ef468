#!/usr/bin/env node
// Interoperability check of the bmsgw OPC UA server with an independent stack (node-opcua).
//
//   cd scripts/interop && npm install
//   node opcua_node.js --url opc.tcp://127.0.0.1:4840/bmsgw --user otto --password ... \
//        --cert client.pem --key client_key.pem --server-cert /var/lib/bmsgw/opcua/server_cert.der
//
// Steps: connect (Basic256Sha256, SignAndEncrypt, username), find our namespace, browse
// BatterySystem, translate a browse path, read a value with its status and source
// timestamp, subscribe to it and wait for notifications, call ResetError, and write a
// measurement (which the server must refuse). Prints one JSON object with what it saw
// (last line of stdout, and into --out FILE when given; node-opcua logs to stdout too);
// exits 0 when every step ran (the caller judges the values), 1 otherwise.
"use strict";

const fs = require("fs");
const path = require("path");
const os = require("os");
const {
    OPCUAClient, MessageSecurityMode, SecurityPolicy, AttributeIds, UserTokenType, ClientSubscription,
    ClientMonitoredItem, TimestampsToReturn, DataType, makeBrowsePath,
} = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");

const NAMESPACE_URI = "urn:bmsgw:opcua:BatterySystem";

function args() {
    const out = {
        url: "opc.tcp://127.0.0.1:4840/bmsgw", user: "", password: "", cert: "", key: "", serverCert: "",
        uri: "urn:bmsgw:interop:node-opcua", read: "Pack.Voltage", notifications: 2, timeout: 20,
        mode: "SignAndEncrypt", policy: "Basic256Sha256", pki: "", out: "",
    };
    const argv = process.argv.slice(2);
    for (let i = 0; i < argv.length; i += 2) {
        const key = argv[i].replace(/^--/, "").replace(/-([a-z])/g, (_, c) => c.toUpperCase());
        if (!(key in out)) throw new Error(`unknown option ${argv[i]}`);
        out[key] = typeof out[key] === "number" ? Number(argv[i + 1]) : argv[i + 1];
    }
    return out;
}

let OUT = "";

function report(obj) {
    const text = JSON.stringify(obj);
    if (OUT) fs.writeFileSync(OUT, text + "\n");
    console.log(text);
}

function ts(d) {
    return d ? d.getTime() / 1000 : null;
}

function dataValue(dv) {
    return {
        value: dv.value && dv.value.value !== undefined ? dv.value.value : null,
        dataType: dv.value ? DataType[dv.value.dataType] : null,
        status: dv.statusCode.name,
        sourceTimestamp: ts(dv.sourceTimestamp),
        serverTimestamp: ts(dv.serverTimestamp),
    };
}

async function main() {
    const opt = args();
    OUT = opt.out;
    const result = { steps: [] };
    const pki = opt.pki || fs.mkdtempSync(path.join(os.tmpdir(), "bmsgw-interop-pki-"));
    const certificateManager = new OPCUACertificateManager({ rootFolder: pki, automaticallyAcceptUnknownCertificate: false });
    await certificateManager.initialize();
    if (opt.serverCert) {
        // trust exactly the gateway's certificate (made on its first start in <state_dir>/opcua/)
        await certificateManager.trustCertificate(fs.readFileSync(opt.serverCert));
    }
    const client = OPCUAClient.create({
        applicationName: "bmsgw-interop",
        applicationUri: opt.uri,
        securityMode: MessageSecurityMode[opt.mode],
        securityPolicy: SecurityPolicy[opt.policy],
        certificateFile: opt.cert || undefined,
        privateKeyFile: opt.key || undefined,
        clientCertificateManager: certificateManager,
        endpointMustExist: false,
        connectionStrategy: { maxRetry: 1, initialDelay: 200, maxDelay: 500 },
        requestedSessionTimeout: 60000,
    });
    const step = (name, data) => { result.steps.push(name); result[name] = data; };
    const timer = setTimeout(() => { report({ ...result, error: "timeout" }); process.exit(1); },
        opt.timeout * 1000);
    await client.connect(opt.url);
    const identity = opt.user ? { type: UserTokenType.UserName, userName: opt.user, password: opt.password }
        : { type: UserTokenType.Anonymous };
    const session = await client.createSession(identity);
    step("connect", { securityMode: opt.mode, securityPolicy: opt.policy, user: opt.user || "anonymous" });

    const namespaces = await session.readNamespaceArray();
    const ns = namespaces.indexOf(NAMESPACE_URI);
    step("namespace", { index: ns, uri: NAMESPACE_URI });

    const browsed = await session.browse(`ns=${ns};s=BatterySystem`);
    step("browse", { status: browsed.statusCode.name, names: browsed.references.map((r) => r.browseName.name) });

    const browsePath = "/" + ["BatterySystem", ...opt.read.split(".")].map((p) => `${ns}:${p}`).join("/");
    const translated = await session.translateBrowsePath(makeBrowsePath("ObjectsFolder", browsePath));
    const target = translated.targets && translated.targets.length ? translated.targets[0].targetId.toString() : null;
    step("translate", { path: browsePath, status: translated.statusCode.name, nodeId: target });

    const nodeId = `ns=${ns};s=BatterySystem.${opt.read}`;
    step("read", dataValue(await session.read({ nodeId, attributeId: AttributeIds.Value })));
    const units = await session.translateBrowsePath(makeBrowsePath(nodeId, "/0:EngineeringUnits"));
    if (units.targets && units.targets.length) {
        const eu = await session.read({ nodeId: units.targets[0].targetId, attributeId: AttributeIds.Value });
        step("units", { unitId: eu.value.value.unitId, displayName: eu.value.value.displayName.text });
    }

    const subscription = ClientSubscription.create(session, {
        requestedPublishingInterval: 100, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 10,
        maxNotificationsPerPublish: 0, publishingEnabled: true, priority: 1,
    });
    const seen = [];
    await new Promise((resolve) => {
        const item = ClientMonitoredItem.create(subscription, { nodeId, attributeId: AttributeIds.Value },
            { samplingInterval: 100, queueSize: 1, discardOldest: true }, TimestampsToReturn.Both);
        item.on("changed", (dv) => {
            seen.push(dataValue(dv));
            if (seen.length >= opt.notifications) resolve();
        });
    });
    step("subscribe", { notifications: seen });
    await subscription.terminate();

    const called = await session.call({
        objectId: `ns=${ns};s=BatterySystem`, methodId: `ns=${ns};s=BatterySystem.ResetError`,
        inputArguments: [{ dataType: DataType.Boolean, value: false }],
    });
    step("call", {
        status: called.statusCode.name,
        outputs: (called.outputArguments || []).map((v) => v.value),
    });

    const written = await session.write({
        nodeId, attributeId: AttributeIds.Value, value: { value: { dataType: DataType.Double, value: 1.0 } },
    });
    step("write", { status: written.name });

    await session.close();
    await client.disconnect();
    clearTimeout(timer);
    report(result);
}

main().catch((err) => {
    report({ error: String(err && err.message ? err.message : err) });
    process.exit(1);
});
