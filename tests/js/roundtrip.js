// KafkaJS (a pure-JavaScript client) against a real spate broker: admin, an idempotent producer
// with keys, headers and GZIP, then a consumer group that reads everything back, commits, and
// whose committed offsets the admin client then reads. Exits non-zero with a message on any
// mismatch. Usage: node roundtrip.js HOST:PORT TOPIC COUNT
'use strict';

const { Kafka, CompressionTypes, logLevel } = require('kafkajs');

const [addr, topic, countArg] = process.argv.slice(2);
const COUNT = Number(countArg);
const PARTITIONS = 3;
const BATCH = 500;
// Bounds every wait so a broken broker fails the test instead of hanging it.
const DEADLINE_MS = 60000;

function fail(msg) {
  console.error(`FAIL: ${msg}`);
  process.exit(1);
}

function withDeadline(promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), DEADLINE_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function main() {
  if (!addr || !topic || !(COUNT > 0)) fail('usage: roundtrip.js HOST:PORT TOPIC COUNT');
  const kafka = new Kafka({
    clientId: 'spate-kafkajs-test',
    brokers: [addr],
    logLevel: logLevel.WARN,
    retry: { retries: 5 },
  });

  const admin = kafka.admin();
  await admin.connect();
  const created = await admin.createTopics({
    topics: [{ topic, numPartitions: PARTITIONS, replicationFactor: 1 }],
    waitForLeaders: true,
  });
  if (!created) fail('createTopics reported the topic as existing');
  const meta = await admin.fetchTopicMetadata({ topics: [topic] });
  const parts = meta.topics[0].partitions;
  if (parts.length !== PARTITIONS) fail(`metadata has ${parts.length} partitions`);
  if (!(await admin.listTopics()).includes(topic)) fail('listTopics misses the topic');

  const producer = kafka.producer({ idempotent: true, maxInFlightRequests: 1 });
  await producer.connect();
  for (let start = 0; start < COUNT; start += BATCH) {
    const messages = [];
    for (let i = start; i < Math.min(COUNT, start + BATCH); i++) {
      messages.push({
        key: `k${i}`,
        value: `v${i}-${'x'.repeat(i % 50)}`,
        partition: i % PARTITIONS,
        headers: { seq: String(i) },
      });
    }
    const compression = (start / BATCH) % 2 === 0 ? CompressionTypes.None : CompressionTypes.GZIP;
    const acks = await producer.send({ topic, messages, acks: -1, compression });
    for (const a of acks) {
      if (a.errorCode !== 0) fail(`produce error ${a.errorCode} on partition ${a.partition}`);
    }
  }
  await producer.disconnect();

  const offsets = await admin.fetchTopicOffsets(topic);
  const total = offsets.reduce((n, o) => n + Number(o.high) - Number(o.low), 0);
  if (total !== COUNT) fail(`high watermarks sum to ${total}, expected ${COUNT}`);

  const groupId = `${topic}-group`;
  const consumer = kafka.consumer({ groupId, sessionTimeout: 10000, heartbeatInterval: 1000 });
  await consumer.connect();
  await consumer.subscribe({ topic, fromBeginning: true });
  const seen = new Set();
  const lastSeq = new Map();
  let done;
  const allSeen = new Promise((resolve) => { done = resolve; });
  await consumer.run({
    autoCommit: true,
    eachMessage: async ({ partition, message }) => {
      const seq = Number(message.headers.seq.toString());
      if (message.key.toString() !== `k${seq}`) fail(`key ${message.key} for seq ${seq}`);
      if (message.value.toString() !== `v${seq}-${'x'.repeat(seq % 50)}`) fail(`value for seq ${seq}`);
      if (seq % PARTITIONS !== partition) fail(`seq ${seq} on partition ${partition}`);
      const prev = lastSeq.get(partition);
      if (prev !== undefined && seq <= prev) fail(`partition ${partition}: ${seq} after ${prev}`);
      lastSeq.set(partition, seq);
      seen.add(seq);
      if (seen.size === COUNT) done();
    },
  });
  await withDeadline(allSeen, `consuming ${COUNT} messages (saw ${seen.size})`);
  // Stopping commits what was consumed (autoCommit), then leaves the group.
  await consumer.stop();
  await consumer.disconnect();

  const committed = await admin.fetchOffsets({ groupId, topics: [topic] });
  const byPartition = new Map(offsets.map((o) => [o.partition, Number(o.high)]));
  for (const p of committed[0].partitions) {
    if (Number(p.offset) !== byPartition.get(p.partition)) {
      fail(`partition ${p.partition} committed ${p.offset}, high watermark ${byPartition.get(p.partition)}`);
    }
  }
  const groups = await admin.describeGroups([groupId]);
  const state = groups.groups[0].state;
  if (state !== 'Empty') fail(`group state after the consumer left: ${state}`);
  await admin.disconnect();
  console.log(`ok: ${COUNT} messages over ${PARTITIONS} partitions, offsets committed`);
}

main().catch((e) => fail(e.stack || String(e)));
