namespace ActorVmm.Devices;

/// <summary>
/// What a device model can ask of the machine it sits in: end the VM with a status (debug-exit),
/// reset it (i8042 pulse of the reset line, port 0x92, port 0xCF9) or power it off (ACPI S5
/// through PM1_CNT). The device's actor turns these into messages.
/// </summary>
public interface IPlatformEvents
{
    void RequestExit(int status, string reason);
    void RequestReset(string reason);
    void RequestPowerOff(string reason);
}

/// <summary>Implemented by models that take bytes from the host (a console's keyboard).</summary>
public interface IHostInput
{
    /// <summary>Offers bytes to the device; returns how many it took (the rest stay with the host).</summary>
    int OfferInput(ReadOnlySpan<byte> data);
}
