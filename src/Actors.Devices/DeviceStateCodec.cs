using System.Collections.Immutable;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace ActorVmm.Devices;

/// <summary>A device state record that cannot be encoded or decoded as it is (a type that is not
/// registered, malformed JSON, a record that fails its model's checks); the message names what is wrong.</summary>
public sealed class SnapshotStateException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// Device state records (<see cref="IStatefulDevice.SaveState"/>) as JSON, for snapshots:
/// <code>{"type": "&lt;short name&gt;", "state": { ...the record, camelCase... }}</code>
/// Only the records registered here are encoded or decoded (<see cref="TypeNames"/>); the type
/// name, not a CLR name, says what a file holds, so nothing else can be instantiated from one.
/// Decoding is strict: every member of the record must be present and of its type, no member may
/// be unknown or null, numbers must fit their fields, byte arrays are base64; the decoded record
/// (a member given twice is refused too) must then pass its model's own checks (<c>StateProblem</c>: FIFO depth, table and RAM sizes),
/// so a record that decodes can be restored. Everything else throws
/// <see cref="SnapshotStateException"/>. Records are plain data (no references or closures): the
/// interrupt lines, clocks and sinks are given again by whoever restores the model.
/// </summary>
public static class DeviceStateCodec
{
    /// <summary>One registered record type: its name in the file and the checks of its model.</summary>
    private sealed record Entry(string Name, Type Type, Func<object, string?> Problem);

    private static Entry Of<T>(string name, Func<T, string?>? problem = null) where T : class =>
        new(name, typeof(T), state => problem?.Invoke((T)state));

    private static readonly Entry[] Entries =
    [
        Of<UartState>("uart16550", Uart16550.StateProblem),
        Of<I8042State>("i8042"),
        Of<IoApicState>("ioapic", IoApic.StateProblem),
        Of<PicState>("pic8259-pair"),
        Of<PitState>("pit8254"),
        Of<CmosRtcState>("cmos-rtc", CmosRtc.StateProblem),
        Of<AcpiPmState>("acpi-pm"),
        Of<ResetControlState>("reset-control"),
        Of<SystemControlPortAState>("system-control-port-a"),
        Of<PcTestDeviceState>("pc-testdev", PcTestDevice.StateProblem),
        Of<ActorVmm.Devices.Virtio.VirtioPciTransportState>("virtio-pci"),
        Of<ActorVmm.Devices.Virtio.VirtioBlkState>("virtio-blk"),
        Of<ActorVmm.Devices.Virtio.VirtioConsoleState>("virtio-console", ActorVmm.Devices.Virtio.VirtioConsole.StateProblem),
        Of<ActorVmm.Devices.Virtio.VirtioNetState>("virtio-net", ActorVmm.Devices.Virtio.VirtioNet.StateProblem),
        Of<ActorVmm.Devices.Pci.PciHostBridgeState>("pci-host-bridge", ActorVmm.Devices.Pci.PciHostBridge.StateProblem),
        Of<ActorVmm.Devices.Virtio.VirtioPciFunctionState>("virtio-pci-function", ActorVmm.Devices.Virtio.VirtioPciFunction.StateProblem),
    ];

    private static readonly Dictionary<string, Entry> ByName = Entries.ToDictionary(e => e.Name, StringComparer.Ordinal);
    private static readonly Dictionary<Type, Entry> ByType = Entries.ToDictionary(e => e.Type);

    private static readonly JsonSerializerOptions Json = new()
    {
        WriteIndented = true,
        PropertyNamingPolicy = JsonNamingPolicy.CamelCase,
        Converters = { new JsonStringEnumConverter(), new Base64Bytes() },
        RespectNullableAnnotations = true,
        RespectRequiredConstructorParameters = true,
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
        AllowDuplicateProperties = false,
        NumberHandling = JsonNumberHandling.Strict,
    };

    /// <summary>The short names of the registered record types, as they appear in <c>"type"</c>.</summary>
    public static IReadOnlyCollection<string> TypeNames => ByName.Keys;

    /// <summary>The registered record types (what a <see cref="DeviceProtocol.StateReply"/> carries).</summary>
    public static IReadOnlyList<Type> RecordTypes { get; } = [.. Entries.Select(e => e.Type)];

    /// <summary>Whether <paramref name="stateType"/> is a registered record type.</summary>
    public static bool IsRegistered(Type stateType) => ByType.ContainsKey(stateType);

    /// <summary>The record as UTF-8 JSON. Throws <see cref="SnapshotStateException"/> for a type that is not registered.</summary>
    public static byte[] Encode(object state)
    {
        ArgumentNullException.ThrowIfNull(state);
        if (!ByType.TryGetValue(state.GetType(), out var entry))
            throw new SnapshotStateException($"{state.GetType().FullName} is not a device state record this codec knows ({Known})");
        if (entry.Problem(state) is { } problem)
            throw new SnapshotStateException($"{entry.Name} state is not restorable: {problem}");
        var buffer = new System.Buffers.ArrayBufferWriter<byte>();
        using (var writer = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = true }))
        {
            writer.WriteStartObject();
            writer.WriteString("type", entry.Name);
            writer.WritePropertyName("state");
            JsonSerializer.Serialize(writer, state, entry.Type, Json);
            writer.WriteEndObject();
        }
        return buffer.WrittenSpan.ToArray();
    }

    /// <summary>
    /// The record <paramref name="json"/> holds (one of the registered types). Throws
    /// <see cref="SnapshotStateException"/> on malformed JSON, an unknown type, a record with missing,
    /// unknown, null or out-of-range members, or one that fails its model's checks.
    /// </summary>
    public static object Decode(ReadOnlySpan<byte> json)
    {
        Envelope? envelope;
        try
        {
            envelope = JsonSerializer.Deserialize<Envelope>(json, Json);
        }
        catch (JsonException e)
        {
            throw new SnapshotStateException($"malformed device state (expected {{\"type\": name, \"state\": record}}): {e.Message}", e);
        }
        if (envelope is null) throw new SnapshotStateException("device state is JSON null");
        if (!ByName.TryGetValue(envelope.Type, out var entry))
            throw new SnapshotStateException($"unknown device state type \"{envelope.Type}\" (known: {Known})");

        object? state;
        try
        {
            state = envelope.State.Deserialize(entry.Type, Json);
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or NotSupportedException)
        {
            throw new SnapshotStateException($"{entry.Name} state is malformed: {e.Message}", e);
        }
        if (state is null) throw new SnapshotStateException($"{entry.Name} state is JSON null");
        if (entry.Problem(state) is { } problem) throw new SnapshotStateException($"{entry.Name} state is not restorable: {problem}");
        return state;
    }

    private static string Known => string.Join(", ", Entries.Select(e => e.Name));

    /// <summary>The outer object; <see cref="State"/> is decoded once <see cref="Type"/> is known.</summary>
    private sealed record Envelope(string Type, JsonElement State);

    /// <summary>Byte arrays (FIFO contents, CMOS bytes, MMIO RAM) as base64, as System.Text.Json
    /// writes byte[]; a JSON null or anything but a base64 string is malformed.</summary>
    private sealed class Base64Bytes : JsonConverter<ImmutableArray<byte>>
    {
        public override bool HandleNull => true;

        public override ImmutableArray<byte> Read(ref Utf8JsonReader reader, Type typeToConvert, JsonSerializerOptions options)
        {
            if (reader.TokenType != JsonTokenType.String) throw new JsonException($"expected a base64 string, found {reader.TokenType}");
            if (!reader.TryGetBytesFromBase64(out var bytes)) throw new JsonException("invalid base64");
            return ImmutableArray.Create(bytes);
        }

        public override void Write(Utf8JsonWriter writer, ImmutableArray<byte> value, JsonSerializerOptions options) =>
            writer.WriteBase64StringValue(value.IsDefault ? [] : value.AsSpan());
    }
}
