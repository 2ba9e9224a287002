use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn pairs(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|(n, v)| {
            (
                String::from_utf8_lossy(n).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}

fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// RFC 7541 C.4: Huffman-coded requests, the second one referring to the
/// first one's `:authority` by dynamic index.
#[test]
fn decoder_follows_rfc_7541_huffman_requests() {
    let mut decoder = Decoder::default();
    let first = decoder
        .decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"))
        .expect("first");
    assert_eq!(
        pairs(&first),
        owned(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ])
    );
    let second = decoder
        .decode(&hex("8286 84be 5886 a8eb 1064 9cbf"))
        .expect("second");
    assert_eq!(
        pairs(&second),
        owned(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
            ("cache-control", "no-cache"),
        ])
    );
    assert_eq!(decoder.size, 110);
}

#[test]
fn decoder_refuses_malformed_blocks() {
    for (block, why) in [
        ("80", "index 0"),
        ("ff 00", "index beyond the table"),
        ("3f e2 1f", "table size beyond 4096"),
        ("82 20", "size update after a field"),
        ("3f", "truncated integer"),
        ("3f ff ff ff ff ff 01", "integer too large"),
        ("41 05 61 62", "truncated string"),
        ("41 81 ff", "bad Huffman padding"),
    ] {
        assert!(
            Decoder::default().decode(&hex(block)).is_err(),
            "{why}: {block}"
        );
    }
}

/// A literal with incremental indexing and an indexed name.
fn literal_indexed(out: &mut Vec<u8>, index: usize, value: &str) {
    put_int(out, 0x40, 6, index);
    put_int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// A gRPC request's header block as grpc-go encodes it: the authority
/// enters the dynamic table the first time and is referred to by index
/// afterwards.
fn grpc_block(first: bool, authority: &str) -> Vec<u8> {
    let mut block = Vec::new();
    block.push(0x83); // :method POST
    block.push(0x86); // :scheme http
    literal_indexed(&mut block, 4, "/runtime.v1.ImageService/ListImages");
    if first {
        literal_indexed(&mut block, 1, authority);
    } else {
        // Dynamic entries are numbered from 62, newest first: the first
        // block added the path, the authority and the content type, and
        // this one the path again.
        put_int(&mut block, 0x80, 7, 64);
    }
    literal_indexed(&mut block, 31, "application/grpc");
    block
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    frame_header(&mut out, payload.len(), kind, flags, stream);
    out.extend_from_slice(payload);
    out.to_vec()
}

/// Everything the layer hands h2 for `input`.
async fn through(input: Vec<u8>) -> io::Result<Vec<u8>> {
    let (mut client, server) = tokio::io::duplex(1 << 22);
    client.write_all(&input).await?;
    drop(client);
    let mut layer = AnyAuthority::new(server);
    let mut out = Vec::new();
    layer.read_to_end(&mut out).await?;
    Ok(out)
}

/// The frames of `bytes` after the preface: (kind, flags, stream, payload).
fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    assert_eq!(&bytes[..PREFACE.len()], PREFACE);
    bytes = &bytes[PREFACE.len()..];
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
        out.push((
            bytes[3],
            bytes[4],
            stream,
            bytes[FRAME_HEADER..FRAME_HEADER + len].to_vec(),
        ));
        bytes = &bytes[FRAME_HEADER + len..];
    }
    out
}

fn authority_of(fields: &[(Vec<u8>, Vec<u8>)]) -> Option<String> {
    pairs(fields)
        .into_iter()
        .find(|(n, _)| n == ":authority")
        .map(|(_, v)| v)
}

#[tokio::test]
async fn socket_path_authorities_become_localhost_and_the_tables_stay_in_step() {
    let path = "/run/hoist/hoist.sock";
    let data = frame(0x0, END_STREAM, 1, b"\0\0\0\0\x02\x0a\x00");
    let mut input = PREFACE.to_vec();
    input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    input.extend(frame(HEADERS, END_HEADERS, 1, &grpc_block(true, path)));
    input.extend(&data);
    input.extend(frame(HEADERS, END_HEADERS, 3, &grpc_block(false, path)));
    let out = through(input).await.expect("layer");
    let frames = frames(&out);
    assert_eq!(frames.len(), 4);
    assert_eq!(frames[0].0, 0x4);
    assert_eq!(
        frame(frames[2].0, frames[2].1, frames[2].2, &frames[2].3),
        data
    );
    // h2's decoder starts empty and this layer never adds to it.
    let mut h2_side = Decoder::default();
    for (i, stream) in [(1, 1), (3, 3)] {
        let (kind, flags, id, block) = &frames[i];
        assert_eq!((*kind, *flags, *id), (HEADERS, END_HEADERS, stream));
        let fields = h2_side.decode(block).expect("re-encoded block");
        assert_eq!(authority_of(&fields).as_deref(), Some("localhost"));
        assert_eq!(
            pairs(&fields)[2],
            (
                ":path".to_string(),
                "/runtime.v1.ImageService/ListImages".to_string()
            )
        );
    }
    assert!(h2_side.table.is_empty());
}

#[tokio::test]
async fn valid_authorities_stay_and_invalid_ones_are_replaced() {
    for (sent, seen) in [
        (Some("localhost"), Some("localhost")),
        (Some("127.0.0.1:5000"), Some("127.0.0.1:5000")),
        (Some("./h.sock"), Some("localhost")),
        (Some("%2Frun%2Fhoist%2Fhoist.sock"), Some("localhost")),
        (Some(""), Some("localhost")),
        (None, None),
    ] {
        let mut block = vec![0x83, 0x86, 0x84];
        if let Some(a) = sent {
            literal_indexed(&mut block, 1, a);
        }
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));
        let out = through(input).await.expect("layer");
        let frames = frames(&out);
        assert_eq!(frames[0].1, END_HEADERS | END_STREAM);
        let fields = Decoder::default().decode(&frames[0].3).expect("block");
        assert_eq!(authority_of(&fields).as_deref(), seen, "sent {sent:?}");
    }
}

#[tokio::test]
async fn padding_priority_and_continuations_are_reassembled_and_resplit() {
    // A header block larger than one frame once re-encoded.
    let mut block = grpc_block(true, "/tmp/a.sock");
    let big = "x".repeat(20_000);
    put_int(&mut block, 0x00, 4, 0);
    put_int(&mut block, 0, 7, 5);
    block.extend_from_slice(b"x-big");
    put_int(&mut block, 0, 7, big.len());
    block.extend_from_slice(big.as_bytes());
    let (a, rest) = block.split_at(10);
    let (b, c) = rest.split_at(10_000);
    let mut headers = vec![3u8]; // pad length
    headers.extend_from_slice(&[0x80, 0, 0, 0, 0x0f]); // exclusive on 0, weight 15
    headers.extend_from_slice(a);
    headers.extend_from_slice(&[0, 0, 0]);
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &headers));
    input.extend(frame(CONTINUATION, 0, 5, b));
    input.extend(frame(CONTINUATION, END_HEADERS, 5, c));
    let out = through(input).await.expect("layer");
    let frames = frames(&out);
    assert_eq!(frames.len(), 2);
    let (kind, flags, stream, payload) = &frames[0];
    assert_eq!(
        (*kind, *flags, *stream),
        (HEADERS, PRIORITY | END_STREAM, 5)
    );
    assert_eq!(&payload[..5], &[0x80, 0, 0, 0, 0x0f]);
    assert_eq!(payload.len(), MAX_FRAME_PAYLOAD);
    assert_eq!(
        (frames[1].0, frames[1].1, frames[1].2),
        (CONTINUATION, END_HEADERS, 5)
    );
    let mut whole = payload[5..].to_vec();
    whole.extend_from_slice(&frames[1].3);
    let fields = Decoder::default().decode(&whole).expect("block");
    assert_eq!(authority_of(&fields).as_deref(), Some("localhost"));
    assert_eq!(pairs(&fields).last().map(|f| f.1.len()), Some(20_000));
}

#[tokio::test]
async fn broken_framing_closes_the_connection() {
    let headers = frame(HEADERS, 0, 1, &grpc_block(true, "/a"));
    let cases = [
        // DATA where a CONTINUATION must come.
        [headers.clone(), frame(0x0, 0, 1, b"x")].concat(),
        // CONTINUATION on another stream.
        [headers.clone(), frame(CONTINUATION, END_HEADERS, 3, &[])].concat(),
        // Padding longer than the frame.
        frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x83]),
        // A CONTINUATION flood past the limit.
        [
            headers.clone(),
            frame(CONTINUATION, 0, 1, &vec![0x83; MAX_FRAME_PAYLOAD]).repeat(70),
        ]
        .concat(),
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let input = [PREFACE.to_vec(), case].concat();
        let err = through(input).await.expect_err("must fail");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "case {i}: {err}");
    }
}

#[tokio::test]
async fn a_connection_that_is_not_http2_passes_unchanged() {
    let input = b"GET / HTTP/1.1\r\nHost: /run/x\r\n\r\n".to_vec();
    assert_eq!(through(input.clone()).await.expect("layer"), input);
}

/// h2 itself, behind the layer, accepts requests whose authority is a
/// socket path, the second one by dynamic index; without the layer it
/// refuses them.
#[tokio::test]
async fn h2_accepts_socket_path_authorities_behind_the_layer() {
    async fn serve(layered: bool) -> Vec<Option<String>> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let path = "/run/hoist/a-rather-long-socket-name.sock";
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        input.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &grpc_block(true, path),
        ));
        input.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            3,
            &grpc_block(false, path),
        ));
        client.write_all(&input).await.expect("write");
        let server: Box<dyn AsyncReadWrite> = if layered {
            Box::new(AnyAuthority::new(server))
        } else {
            Box::new(server)
        };
        let mut conn = h2::server::handshake(server).await.expect("handshake");
        let mut seen = Vec::new();
        // Drain the client side so h2's writes never block.
        tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        });
        while let Ok(Some(Ok((request, _respond)))) =
            tokio::time::timeout(std::time::Duration::from_millis(500), conn.accept()).await
        {
            seen.push(request.uri().authority().map(|a| a.to_string()));
        }
        seen
    }
    trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

    assert_eq!(
        serve(true).await,
        vec![Some("localhost".to_string()), Some("localhost".to_string())]
    );
    assert!(serve(false).await.is_empty());
}
