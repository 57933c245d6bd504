//! The rpc transport on loopback: two nodes exchange consensus messages; a garbage peer, an
//! oversized length prefix and a node of another cluster are each refused without harming the
//! good connection; appends of every batch size cross intact and in order.

use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::LocalReceiver;
use glommio::net::TcpStream;
use glommio::LocalExecutorBuilder;
use spate_replication::identity::NodeIdentity;
use spate_replication::rpc::{
    Frame, FrameCodec, Hello, Incoming, RpcMessage, Transport, TransportConfig,
    RPC_PROTOCOL_VERSION,
};
use spate_replication::{AppendRequest, Batch, Message, NodeMessage};

const DEADLINE: Duration = Duration::from_secs(10);

fn ident(node_id: u64, cluster: &str) -> NodeIdentity {
    NodeIdentity {
        node_id,
        node_uuid: 0xABCD_0000 + u128::from(node_id),
        cluster_id: cluster.into(),
    }
}

fn consensus(from: u64, to: u64, epoch: i32) -> Frame {
    Frame {
        correlation_id: 0,
        message: RpcMessage::Consensus(NodeMessage {
            from,
            to,
            items: vec![(7, Message::TimeoutNow { epoch })],
        }),
    }
}

fn bind(id: &NodeIdentity) -> (Transport, LocalReceiver<Incoming>) {
    Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        id,
        TransportConfig::default(),
    )
    .unwrap()
}

async fn recv(rx: &LocalReceiver<Incoming>) -> Incoming {
    glommio::future::timeout(DEADLINE, rx.recv())
        .await
        .expect("a frame within the deadline")
        .expect("inbox open")
}

/// Sends `epoch` from a to b until it arrives (earlier frames are skipped); a frame queued on a
/// connection that is closing may be lost, as on any network.
async fn exchange(a: &Transport, rx_b: &LocalReceiver<Incoming>, epoch: i32) {
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < DEADLINE, "frame {epoch} never arrived");
        a.send(2, &consensus(1, 2, epoch)).unwrap();
        while let Ok(Some(m)) =
            glommio::future::timeout(Duration::from_millis(200), rx_b.recv()).await
        {
            assert_eq!(m.from, 1);
            if m.frame == consensus(1, 2, epoch) {
                return;
            }
        }
    }
}

/// Reads until the peer closes; returns what it sent first.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = glommio::future::timeout(DEADLINE, s.read(&mut buf))
            .await
            .expect("closed within the deadline")
            .unwrap_or(0);
        if n == 0 {
            return all;
        }
        all.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn nodes_exchange_frames_and_bad_peers_are_refused_alone() {
    LocalExecutorBuilder::default()
        .spawn(|| async {
            let (a, rx_a) = bind(&ident(1, "c"));
            let (b, rx_b) = bind(&ident(2, "c"));
            a.add_peer(2, b.local_addr().to_string());
            b.add_peer(1, a.local_addr().to_string());

            // Both ways, and a reply on the connection a request came on.
            exchange(&a, &rx_b, 1).await;
            b.send(1, &consensus(2, 1, 2)).unwrap();
            assert_eq!(recv(&rx_a).await.frame, consensus(2, 1, 2));
            a.send(2, &consensus(1, 2, 3)).unwrap();
            let m = recv(&rx_b).await;
            m.reply.send(&consensus(2, 1, 4)).unwrap();
            assert_eq!(recv(&rx_a).await.frame, consensus(2, 1, 4));

            // Garbage: an unknown frame kind where the hello belongs.
            let mut g = TcpStream::connect(b.local_addr()).await.unwrap();
            g.write_all(&[0, 0, 0, 9, 0xEE, 0, 0, 0, 0, 0, 0, 0, 0])
                .await
                .unwrap();
            read_until_closed(&mut g).await;
            exchange(&a, &rx_b, 5).await;

            // A length prefix of 4 GiB: refused on its four bytes, nothing allocated.
            let mut g = TcpStream::connect(b.local_addr()).await.unwrap();
            g.write_all(&[0xFF, 0xFF, 0xFF, 0xFF]).await.unwrap();
            read_until_closed(&mut g).await;
            exchange(&a, &rx_b, 6).await;

            // A hello, then an oversized frame after the handshake.
            let codec = FrameCodec::default();
            let mut g = TcpStream::connect(b.local_addr()).await.unwrap();
            let hello = Frame {
                correlation_id: 0,
                message: RpcMessage::Hello(Hello {
                    protocol_version: RPC_PROTOCOL_VERSION,
                    cluster_id: "c".into(),
                    node_id: 3,
                    node_uuid: 33,
                }),
            };
            g.write_all(&codec.encode(&hello).unwrap().to_bytes())
                .await
                .unwrap();
            g.write_all(&[0x7F, 0xFF, 0xFF, 0xFF]).await.unwrap();
            let got = read_until_closed(&mut g).await;
            let mut got = bytes::BytesMut::from(&got[..]);
            let reply = codec.decode(&mut got).unwrap().expect("b's hello");
            assert!(matches!(reply.message, RpcMessage::Hello(h) if h.node_id == 2));
            exchange(&a, &rx_b, 7).await;

            // A node of another cluster dials b: refused with the reason, and b keeps a.
            let before = b.stats().handshakes_refused;
            let (x, _rx_x) = bind(&ident(3, "other"));
            x.add_peer(2, b.local_addr().to_string());
            x.send(2, &consensus(3, 2, 99)).unwrap();
            let start = Instant::now();
            while b.stats().handshakes_refused == before {
                assert!(start.elapsed() < DEADLINE, "wrong cluster id not refused");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            // The refused peer's frame never reaches b's owner (`exchange` checks the sender).
            exchange(&a, &rx_b, 8).await;

            // b restarts on a new port: a re-dials there once told.
            b.stop();
            drop(rx_b);
            let (b2, rx_b2) = bind(&ident(2, "c"));
            a.add_peer(2, b2.local_addr().to_string());
            exchange(&a, &rx_b2, 9).await;
            assert!(a.stats().frames_sent >= 5);
            a.stop();
            b2.stop();
            x.stop();
        })
        .unwrap()
        .join()
        .unwrap();
}

/// An append of one batch per size, each batch's bytes a pattern of its size and `seed`.
fn append(seed: u8, sizes: &[usize]) -> Frame {
    let batches: Vec<Batch> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| Batch {
            base: i as u64,
            count: 1,
            epoch: 1,
            bytes: (0..n)
                .map(|j| (j as u8).wrapping_mul(31).wrapping_add(seed))
                .collect(),
            membership: None,
        })
        .collect();
    Frame {
        correlation_id: u64::from(seed),
        message: RpcMessage::Consensus(NodeMessage {
            from: 1,
            to: 2,
            items: vec![(
                7,
                Message::Append(AppendRequest {
                    epoch: 1,
                    prev_offset: 0,
                    prev_epoch: 0,
                    commit: 0,
                    fill_end: sizes.len() as u64,
                    quiesce: 0,
                    batches,
                }),
            )],
        }),
    }
}

#[test]
fn appends_of_every_size_cross_intact_and_in_order() {
    LocalExecutorBuilder::default()
        .spawn(|| async {
            let (a, _rx_a) = bind(&ident(1, "c"));
            let (b, rx_b) = bind(&ident(2, "c"));
            a.add_peer(2, b.local_addr().to_string());
            exchange(&a, &rx_b, 1).await;

            // Queued at once, so writes gather several; large batches go by reference, tiny
            // ones inline, and the reader meets frames split anywhere across its reads.
            let shapes: [&[usize]; 6] = [
                &[1],
                &[255, 256, 257],
                &[64 << 10],
                &[3 << 20, 10, 700 << 10],
                &[100; 300],
                &[8 << 20],
            ];
            let mut sent = Vec::new();
            for round in 0..3u8 {
                for (i, sizes) in shapes.iter().enumerate() {
                    let f = append(round * 10 + i as u8, sizes);
                    a.send(2, &f).unwrap();
                    sent.push(f);
                    let small = consensus(1, 2, 100 + i32::from(round) * 10 + i as i32);
                    a.send(2, &small).unwrap();
                    sent.push(small);
                }
            }
            for want in &sent {
                // A late copy of the first exchange's frame may come first.
                let got = loop {
                    let m = recv(&rx_b).await;
                    if m.frame != consensus(1, 2, 1) {
                        break m;
                    }
                };
                assert_eq!(got.from, 1);
                assert!(
                    &got.frame == want,
                    "a frame arrived changed or out of order"
                );
            }
            assert_eq!(a.stats().frames_dropped, 0);

            // Before the handshake only a hello-sized frame is taken: a 64 KiB length prefix
            // closes the connection at once, without waiting out the handshake timeout.
            let start = Instant::now();
            let mut g = TcpStream::connect(b.local_addr()).await.unwrap();
            g.write_all(&(64u32 << 10).to_be_bytes()).await.unwrap();
            read_until_closed(&mut g).await;
            assert!(start.elapsed() < TransportConfig::default().handshake_timeout);
            exchange(&a, &rx_b, 2).await;
            a.stop();
            b.stop();
        })
        .unwrap()
        .join()
        .unwrap();
}
