namespace ActorVmm.Devices;

/// <summary>
/// QEMU's isa-debug-exit: a write of v asks the VM to end with status (v &lt;&lt; 1) | 1, so a
/// guest can never produce status 0 and a test harness can tell "guest said pass" from "VMM ok".
/// The value is taken at the access size (the low byte for an 8-bit write, the whole value for a
/// wider one), as QEMU does. Reads return all ones. No state.
/// </summary>
public sealed class DebugExit(IPlatformEvents events) : IBusDevice
{
    public ulong Read(ulong offset, int size) => ulong.MaxValue;

    public void Write(ulong offset, int size, ulong value)
    {
        var v = AccessSize.Mask(value, size);
        events.RequestExit(unchecked((int)((v << 1) | 1)), "debug-exit");
    }
}
